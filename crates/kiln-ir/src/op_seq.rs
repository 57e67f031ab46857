//! Typed sequence and optional ops (Sequence*, SplitToSequence, ConcatFromSequence,
//! SequenceMap, Optional*, Scan). They are executed by the runtime, not by a
//! kiln-cpu kernel: their values are sequences and optionals, or (Scan,
//! SequenceMap) they run a subgraph.
//!
//! The frontend parses them in `kiln-onnx/src/convert_seq.rs`; the runtime runs
//! them in `kiln-runtime/src/seq.rs`.

use crate::{DType, Dim, Graph, Shape, Tensor, ValueType};

/// Scan attributes, normalized over opset 8 (batched, with `sequence_lens`) and
/// opset 9+ (unbatched, with per-input/output axes and directions).
#[derive(Clone, Debug, PartialEq)]
pub struct ScanAttrs {
    /// Body: (state..., scan_element...) -> (state..., scan_output_element...).
    pub body: Box<Graph>,
    pub num_scan_inputs: usize,
    /// Opset 8 form: input 0 is `sequence_lens` (optional), and every state and
    /// scan input and output has a leading batch axis (scan axis 1).
    pub batched: bool,
    /// Per scan input: the axis scanned (empty: all 0). Negative counts from the end.
    pub input_axes: Vec<i64>,
    /// Per scan input: whether it is read last to first (empty: all forward).
    pub input_reverse: Vec<bool>,
    /// Per scan output: the axis the iterations stack along (empty: all 0).
    pub output_axes: Vec<i64>,
    /// Per scan output: whether iterations are stacked last to first.
    pub output_reverse: Vec<bool>,
}

/// Sequence and optional ops; executed by the runtime.
#[derive(Clone, Debug, PartialEq)]
pub enum SeqOp {
    /// Inputs: tensors (at least one, one dtype) -> a sequence of them.
    SequenceConstruct,
    /// No inputs -> an empty sequence of `dtype` tensors.
    SequenceEmpty {
        dtype: DType,
    },
    /// Inputs: sequence, tensor, position? (default: append).
    SequenceInsert,
    /// Inputs: sequence, position -> the tensor there.
    SequenceAt,
    /// Inputs: sequence, position? (default: the last).
    SequenceErase,
    /// Input: sequence -> its length (i64 scalar).
    SequenceLength,
    /// Inputs: input, split? (scalar chunk size or 1-D sizes). With no split,
    /// chunks of 1, squeezed unless `keepdims`.
    SplitToSequence {
        axis: i64,
        keepdims: bool,
    },
    /// Input: sequence -> its tensors concatenated along `axis` (stacked along a
    /// new axis when `new_axis`).
    ConcatFromSequence {
        axis: i64,
        new_axis: bool,
    },
    /// Inputs: sequence, then sequences or tensors. The body runs once per
    /// position; each output is the sequence of its results.
    SequenceMap {
        body: Box<Graph>,
    },
    /// Input: value? -> an optional holding it, or an empty optional.
    Optional,
    /// Input: optional (or a plain value, or absent) -> bool scalar.
    OptionalHasElement,
    /// Input: optional (or a plain value, returned as is) -> its content.
    OptionalGetElement,
    Scan(ScanAttrs),
}

impl SeqOp {
    /// The ONNX operator name.
    pub fn name(&self) -> &'static str {
        match self {
            SeqOp::SequenceConstruct => "SequenceConstruct",
            SeqOp::SequenceEmpty { .. } => "SequenceEmpty",
            SeqOp::SequenceInsert => "SequenceInsert",
            SeqOp::SequenceAt => "SequenceAt",
            SeqOp::SequenceErase => "SequenceErase",
            SeqOp::SequenceLength => "SequenceLength",
            SeqOp::SplitToSequence { .. } => "SplitToSequence",
            SeqOp::ConcatFromSequence { .. } => "ConcatFromSequence",
            SeqOp::SequenceMap { .. } => "SequenceMap",
            SeqOp::Optional => "Optional",
            SeqOp::OptionalHasElement => "OptionalHasElement",
            SeqOp::OptionalGetElement => "OptionalGetElement",
            SeqOp::Scan(_) => "Scan",
        }
    }

    /// Subgraphs this op holds (Scan body, SequenceMap body).
    pub fn subgraphs(&self) -> Vec<&Graph> {
        match self {
            SeqOp::SequenceMap { body } => vec![body],
            SeqOp::Scan(a) => vec![&a.body],
            _ => vec![],
        }
    }

    /// Output types from input types (`None`: absent or unknown) and the values of
    /// constant inputs. Returns one entry per node output (`None`: unknown), or a
    /// message saying what is wrong with the inputs.
    pub fn infer(
        &self,
        types: &[Option<ValueType>],
        _consts: &[Option<&Tensor>],
        num_outputs: usize,
    ) -> Result<Vec<Option<ValueType>>, String> {
        let ty = |i: usize| types.get(i).and_then(|t| t.as_ref());
        let seq_in = |i: usize| -> Result<Option<&ValueType>, String> {
            match ty(i) {
                Some(t) if t.is_tensor() => Err(format!(
                    "input {i} must be a sequence, got a tensor ({})",
                    t.describe()
                )),
                other => Ok(other),
            }
        };
        let one = |t: Option<ValueType>| -> Vec<Option<ValueType>> {
            let mut v = vec![t];
            v.resize(num_outputs.max(1), None);
            v
        };
        Ok(match self {
            SeqOp::SequenceConstruct => {
                if types.is_empty() {
                    return Err("needs at least one input tensor".into());
                }
                let mut elem: Option<ValueType> = None;
                let mut all_known = true;
                for (i, t) in types.iter().enumerate() {
                    let Some(t) = t else {
                        all_known = false;
                        continue;
                    };
                    if !t.is_tensor() {
                        return Err(format!("input {i} must be a tensor, got {}", t.describe()));
                    }
                    elem = Some(match elem {
                        None => t.clone(),
                        Some(e) if e.dtype != t.dtype => {
                            return Err(format!(
                                "input {i} is {} but an earlier input is {}",
                                t.dtype, e.dtype
                            ))
                        }
                        Some(e) => ValueType::new(e.dtype, join_shapes(&e.shape, &t.shape)),
                    });
                }
                if !all_known {
                    elem = elem.map(|e| ValueType::new(e.dtype, None));
                }
                one(elem.map(ValueType::sequence_of))
            }
            SeqOp::SequenceEmpty { dtype } => {
                one(Some(ValueType::sequence_of(ValueType::new(*dtype, None))))
            }
            SeqOp::SequenceInsert => {
                let s = seq_in(0)?;
                if let (Some(s), Some(t)) = (s, ty(1)) {
                    if !t.is_tensor() {
                        return Err(format!("input 1 must be a tensor, got {}", t.describe()));
                    }
                    if s.dtype != t.dtype {
                        return Err(format!(
                            "the tensor is {} but the sequence holds {}",
                            t.dtype, s.dtype
                        ));
                    }
                    let elem = ValueType::new(s.dtype, join_shapes(&s.shape, &t.shape));
                    one(Some(ValueType {
                        kind: s.kind.clone(),
                        ..elem
                    }))
                } else {
                    one(s.map(|s| ValueType {
                        shape: None,
                        ..s.clone()
                    }))
                }
            }
            SeqOp::SequenceAt => one(seq_in(0)?.map(ValueType::inner)),
            SeqOp::SequenceErase => one(seq_in(0)?.cloned()),
            SeqOp::SequenceLength => one(Some(ValueType::new(DType::I64, Some(vec![])))),
            SeqOp::SplitToSequence { axis, keepdims } => {
                let elem = ty(0).map(|t| {
                    let shape = t.shape.as_ref().and_then(|s| {
                        let a = norm_axis(*axis, s.len())?;
                        let mut out: Shape = s.clone();
                        if types.get(1).is_some_and(|t| t.is_some()) {
                            out[a] = Dim::Unknown;
                        } else if *keepdims {
                            out[a] = Dim::Known(1);
                        } else {
                            out.remove(a);
                        }
                        Some(out)
                    });
                    ValueType::new(t.dtype, shape)
                });
                one(elem.map(ValueType::sequence_of))
            }
            SeqOp::ConcatFromSequence { axis, new_axis } => one(seq_in(0)?.map(|s| {
                let shape = s.shape.as_ref().and_then(|e| {
                    let rank = e.len() + usize::from(*new_axis);
                    let a = norm_axis(*axis, rank)?;
                    let mut out = e.clone();
                    if *new_axis {
                        out.insert(a, Dim::Unknown);
                    } else {
                        out[a] = Dim::Unknown;
                    }
                    Some(out)
                });
                ValueType::new(s.dtype, shape)
            })),
            SeqOp::SequenceMap { body } => {
                let mut out = Vec::with_capacity(num_outputs);
                for k in 0..num_outputs {
                    out.push(
                        body.outputs
                            .get(k)
                            .filter(|o| !is_placeholder(&o.ty) && o.ty.is_tensor())
                            .map(|o| ValueType::sequence_of(o.ty.clone())),
                    );
                }
                out
            }
            SeqOp::Optional => one(ty(0).cloned().map(ValueType::optional_of)),
            SeqOp::OptionalHasElement => one(Some(ValueType::new(DType::Bool, Some(vec![])))),
            SeqOp::OptionalGetElement => one(ty(0).map(|t| match t.kind {
                crate::ValueKind::Optional(_) => t.inner(),
                _ => t.clone(),
            })),
            SeqOp::Scan(a) => scan_types(a, types, num_outputs)?,
        })
    }
}

/// Declared types the frontend writes for untyped values.
fn is_placeholder(t: &ValueType) -> bool {
    t.dtype == DType::F32 && t.shape.is_none() && t.is_tensor()
}

fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = i64::try_from(rank).ok()?;
    let a = if axis < 0 { axis.checked_add(r)? } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

/// Dims that agree stay, others become unknown; differing ranks give no rank.
fn join_shapes(a: &Option<Shape>, b: &Option<Shape>) -> Option<Shape> {
    match (a, b) {
        (Some(x), Some(y)) if x.len() == y.len() => Some(
            x.iter()
                .zip(y)
                .map(|(p, q)| if p == q { p.clone() } else { Dim::Unknown })
                .collect(),
        ),
        _ => None,
    }
}

/// Scan outputs: final states (typed like the state inputs) then scan outputs
/// (the body's output element with the iteration axis inserted).
fn scan_types(
    a: &ScanAttrs,
    types: &[Option<ValueType>],
    num_outputs: usize,
) -> Result<Vec<Option<ValueType>>, String> {
    let skip = usize::from(a.batched);
    let n_in = types.len().saturating_sub(skip);
    if a.num_scan_inputs == 0 || a.num_scan_inputs > n_in {
        return Err(format!(
            "num_scan_inputs is {} but the node has {n_in} state and scan inputs",
            a.num_scan_inputs
        ));
    }
    let n_state = n_in - a.num_scan_inputs;
    let mut out: Vec<Option<ValueType>> = Vec::with_capacity(num_outputs);
    for i in 0..n_state.min(num_outputs) {
        out.push(types.get(skip + i).cloned().flatten());
    }
    // The number of iterations, when the first scan input's shape says it.
    let first_scan = types.get(skip + n_state).and_then(|t| t.as_ref());
    let (batch, trips) = match first_scan.and_then(|t| t.shape.as_ref()) {
        Some(s) if a.batched => (
            s.first().cloned().unwrap_or(Dim::Unknown),
            s.get(1).cloned().unwrap_or(Dim::Unknown),
        ),
        Some(s) => {
            let axis = a.input_axes.first().copied().unwrap_or(0);
            let t = norm_axis(axis, s.len())
                .and_then(|i| s.get(i).cloned())
                .unwrap_or(Dim::Unknown);
            (Dim::Unknown, t)
        }
        None => (Dim::Unknown, Dim::Unknown),
    };
    for k in 0..num_outputs.saturating_sub(n_state) {
        let Some(o) = a.body.outputs.get(n_state + k) else {
            out.push(None);
            continue;
        };
        if is_placeholder(&o.ty) || !o.ty.is_tensor() {
            out.push(None);
            continue;
        }
        let shape = o.ty.shape.as_ref().and_then(|s| {
            let mut v = s.clone();
            if a.batched {
                v.insert(0, trips.clone());
                v.insert(0, batch.clone());
            } else {
                let axis = a.output_axes.get(k).copied().unwrap_or(0);
                let at = norm_axis(axis, s.len() + 1)?;
                v.insert(at, trips.clone());
            }
            Some(v)
        });
        out.push(Some(ValueType::new(o.ty.dtype, shape)));
    }
    out.truncate(num_outputs);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ValueInfo, ValueKind};

    fn t(dtype: DType, dims: &[usize]) -> Option<ValueType> {
        Some(ValueType::new(dtype, Some(crate::known_shape(dims))))
    }

    fn seq(dtype: DType, dims: &[usize]) -> Option<ValueType> {
        t(dtype, dims).map(ValueType::sequence_of)
    }

    #[test]
    fn sequence_types() {
        let c = SeqOp::SequenceConstruct
            .infer(&[t(DType::F32, &[2]), t(DType::F32, &[3])], &[], 1)
            .unwrap();
        let s = c[0].clone().unwrap();
        assert_eq!(s.kind, ValueKind::Sequence(Box::new(ValueKind::Tensor)));
        assert_eq!(s.shape, Some(vec![Dim::Unknown]));
        assert_eq!(s.describe(), "seq(f32 [?])");
        let e = SeqOp::SequenceConstruct
            .infer(&[t(DType::F32, &[2]), t(DType::I64, &[2])], &[], 1)
            .unwrap_err();
        assert!(e.contains("i64") && e.contains("f32"), "{e}");

        let at = SeqOp::SequenceAt
            .infer(&[seq(DType::I32, &[4]), t(DType::I64, &[])], &[], 1)
            .unwrap();
        assert_eq!(at[0], t(DType::I32, &[4]));
        let e = SeqOp::SequenceAt
            .infer(&[t(DType::I32, &[4]), t(DType::I64, &[])], &[], 1)
            .unwrap_err();
        assert!(e.contains("sequence"), "{e}");

        let ins = SeqOp::SequenceInsert
            .infer(&[seq(DType::F32, &[2]), t(DType::I64, &[2])], &[], 1)
            .unwrap_err();
        assert!(ins.contains("i64"), "{ins}");
        let len = SeqOp::SequenceLength
            .infer(&[seq(DType::F32, &[2])], &[], 1)
            .unwrap();
        assert_eq!(len[0], t(DType::I64, &[]));
    }

    #[test]
    fn split_concat_and_optional_types() {
        let s = SeqOp::SplitToSequence {
            axis: -1,
            keepdims: false,
        }
        .infer(&[t(DType::F32, &[3, 6])], &[], 1)
        .unwrap();
        assert_eq!(s[0], seq(DType::F32, &[3]));
        let c = SeqOp::ConcatFromSequence {
            axis: -1,
            new_axis: true,
        }
        .infer(&[seq(DType::F32, &[3])], &[], 1)
        .unwrap();
        assert_eq!(
            c[0],
            Some(ValueType::new(
                DType::F32,
                Some(vec![Dim::Known(3), Dim::Unknown])
            ))
        );
        let o = SeqOp::Optional
            .infer(&[seq(DType::F32, &[3])], &[], 1)
            .unwrap();
        let o = o[0].clone().unwrap();
        assert_eq!(o.describe(), "optional(seq(f32 [3]))");
        let g = SeqOp::OptionalGetElement.infer(&[Some(o)], &[], 1).unwrap();
        assert_eq!(g[0], seq(DType::F32, &[3]));
        // Unknown input: unknown output, not an error.
        assert_eq!(SeqOp::Optional.infer(&[None], &[], 1).unwrap(), vec![None]);
    }

    #[test]
    fn scan_types_insert_the_iteration_axis() {
        let vi = |n: &str, dims: &[usize]| ValueInfo {
            name: n.into(),
            ty: ValueType::new(DType::F32, Some(crate::known_shape(dims))),
        };
        let body = Graph {
            inputs: vec![vi("s", &[2]), vi("x", &[2])],
            outputs: vec![vi("s2", &[2]), vi("y", &[2])],
            ..Default::default()
        };
        let mut a = ScanAttrs {
            body: Box::new(body),
            num_scan_inputs: 1,
            batched: false,
            input_axes: vec![],
            input_reverse: vec![],
            output_axes: vec![1],
            output_reverse: vec![],
        };
        let op = SeqOp::Scan(a.clone());
        let out = op
            .infer(&[t(DType::F32, &[2]), t(DType::F32, &[5, 2])], &[], 2)
            .unwrap();
        assert_eq!(out[0], t(DType::F32, &[2]));
        assert_eq!(out[1], t(DType::F32, &[2, 5]));
        a.num_scan_inputs = 3;
        let e = SeqOp::Scan(a)
            .infer(&[t(DType::F32, &[2]), t(DType::F32, &[5, 2])], &[], 2)
            .unwrap_err();
        assert!(e.contains("num_scan_inputs"), "{e}");
    }
}
