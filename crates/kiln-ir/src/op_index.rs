//! Typed indexing, scatter, sorting and rearrangement ops (GatherND, Scatter*, TopK, Unique, NonZero, CumSum, OneHot, Einsum, DepthToSpace, ...).
//!
//! Each family of ops keeps its enum, its ONNX names and its shape/type rule
//! here; the frontend parses it in `kiln-onnx/src/convert_index.rs` and the kernels
//! live in `kiln-cpu/src/index.rs`.

use crate::{BinaryOp, DType, Dim, Shape, Tensor, ValueType};

/// indexing, scatter, sorting and rearrangement ops (GatherND, Scatter*, TopK, Unique, NonZero, CumSum, OneHot, Einsum, DepthToSpace, ...).
#[derive(Clone, Debug, PartialEq)]
pub enum IndexOp {
    /// Inputs: data, indices.
    GatherND {
        batch_dims: usize,
    },
    /// Inputs: data, indices, updates. `reduction`: how an update combines with
    /// the existing element (`None`: replace; else Add, Mul, Max or Min).
    ScatterND {
        reduction: Option<BinaryOp>,
    },
    /// Inputs: data, indices, updates. `legacy`: came from the deprecated
    /// `Scatter` op (same semantics, kept for the name in messages).
    ScatterElements {
        axis: i64,
        reduction: Option<BinaryOp>,
        legacy: bool,
    },
    /// Inputs: X, K (one-element integer tensor). Outputs: Values, Indices (i64).
    /// Ties go to the lower index; output is always sorted.
    TopK {
        axis: i64,
        largest: bool,
    },
    /// Inputs: x, axis (scalar).
    CumSum {
        exclusive: bool,
        reverse: bool,
    },
    /// Inputs: x, axis (scalar).
    CumProd {
        exclusive: bool,
        reverse: bool,
    },
    /// Input: X. Output: i64 `[rank, nnz]`.
    NonZero,
    /// Inputs: indices, depth, values (`[off, on]`).
    OneHot {
        axis: i64,
    },
    /// Inputs: input, condition. `None`: flatten first.
    Compress {
        axis: Option<i64>,
    },
    /// Outputs: Y, indices, inverse_indices, counts. `None`: over the flattened input.
    Unique {
        axis: Option<i64>,
        sorted: bool,
    },
    /// Inputs: any number of operands.
    Einsum {
        equation: String,
    },
    /// Inputs: input, sequence_lens.
    ReverseSequence {
        batch_axis: i64,
        time_axis: i64,
    },
    /// `crd`: CRD channel order instead of DCR.
    SpaceToDepth {
        blocksize: usize,
        crd: bool,
    },
    DepthToSpace {
        blocksize: usize,
        crd: bool,
    },
    /// Inputs: input, shape. Empty `axes`: all axes.
    CenterCropPad {
        axes: Vec<i64>,
    },
    /// Inputs: input, image_shape, block_shape. Empty vectors: defaults.
    Col2Im {
        dilations: Vec<usize>,
        pads: Vec<usize>,
        strides: Vec<usize>,
    },
    /// `dtype`: `None` keeps the input's type.
    EyeLike {
        dtype: Option<DType>,
        k: i64,
    },
    Det,
    Shrink {
        lambd: f32,
        bias: f32,
    },
    Swish {
        alpha: f32,
    },
    /// `coerce_2d`: opset < 13 semantics (flatten to 2-D at `axis`).
    Hardmax {
        axis: i64,
        coerce_2d: bool,
    },
    /// Inputs: past_cache, update, write_indices?.
    TensorScatter {
        axis: i64,
        circular: bool,
    },
}

impl IndexOp {
    /// The ONNX operator name.
    pub fn name(&self) -> &'static str {
        match self {
            IndexOp::GatherND { .. } => "GatherND",
            IndexOp::ScatterND { .. } => "ScatterND",
            IndexOp::ScatterElements { legacy: true, .. } => "Scatter",
            IndexOp::ScatterElements { .. } => "ScatterElements",
            IndexOp::TopK { .. } => "TopK",
            IndexOp::CumSum { .. } => "CumSum",
            IndexOp::CumProd { .. } => "CumProd",
            IndexOp::NonZero => "NonZero",
            IndexOp::OneHot { .. } => "OneHot",
            IndexOp::Compress { .. } => "Compress",
            IndexOp::Unique { .. } => "Unique",
            IndexOp::Einsum { .. } => "Einsum",
            IndexOp::ReverseSequence { .. } => "ReverseSequence",
            IndexOp::SpaceToDepth { .. } => "SpaceToDepth",
            IndexOp::DepthToSpace { .. } => "DepthToSpace",
            IndexOp::CenterCropPad { .. } => "CenterCropPad",
            IndexOp::Col2Im { .. } => "Col2Im",
            IndexOp::EyeLike { .. } => "EyeLike",
            IndexOp::Det => "Det",
            IndexOp::Shrink { .. } => "Shrink",
            IndexOp::Swish { .. } => "Swish",
            IndexOp::Hardmax { .. } => "Hardmax",
            IndexOp::TensorScatter { .. } => "TensorScatter",
        }
    }

    /// Output types from input types (`None`: absent or unknown) and the values of
    /// constant inputs. Returns one entry per node output (`None`: unknown), or a
    /// message saying what is wrong with the inputs.
    pub fn infer(
        &self,
        types: &[Option<ValueType>],
        consts: &[Option<&Tensor>],
        num_outputs: usize,
    ) -> Result<Vec<Option<ValueType>>, String> {
        let ty = |i: usize| types.get(i).and_then(|t| t.as_ref());
        let shape = |i: usize| ty(i).and_then(|t| t.shape.clone());
        let dt = |i: usize| ty(i).map(|t| t.dtype);
        let cst = |i: usize| consts.get(i).copied().flatten();
        let cst_ints = |i: usize| cst(i).and_then(|t| t.to_i64_vec().ok());
        let same = |i: usize| ty(i).cloned();
        let mut out: Vec<Option<ValueType>> = match self {
            IndexOp::ScatterND { .. }
            | IndexOp::ScatterElements { .. }
            | IndexOp::CumSum { .. }
            | IndexOp::CumProd { .. }
            | IndexOp::ReverseSequence { .. }
            | IndexOp::Shrink { .. }
            | IndexOp::Swish { .. }
            | IndexOp::Hardmax { .. }
            | IndexOp::TensorScatter { .. } => vec![same(0)],
            IndexOp::GatherND { batch_dims } => {
                let s = match (shape(0), shape(1)) {
                    (Some(d), Some(i)) => match i.last().and_then(Dim::known) {
                        Some(last) => {
                            let b = *batch_dims;
                            if i.len() < b + 1 || d.len() < b + last {
                                return Err(format!(
                                    "indices {} and data {} do not fit batch_dims {b}",
                                    crate::format_shape(&i),
                                    crate::format_shape(&d)
                                ));
                            }
                            let mut s: Shape = i[..i.len() - 1].to_vec();
                            s.extend_from_slice(&d[b + last..]);
                            Some(s)
                        }
                        None => None,
                    },
                    _ => None,
                };
                vec![dt(0).map(|d| ValueType::new(d, s))]
            }
            IndexOp::TopK { axis, .. } => {
                let s = shape(0).and_then(|mut s| {
                    let ax = norm_axis(*axis, s.len())?;
                    s[ax] = match cst_ints(1).as_deref() {
                        Some([k]) if *k >= 0 => Dim::Known(*k as usize),
                        _ => Dim::Unknown,
                    };
                    Some(s)
                });
                vec![
                    dt(0).map(|d| ValueType::new(d, s.clone())),
                    Some(ValueType::new(DType::I64, s)),
                ]
            }
            IndexOp::NonZero => {
                let s = shape(0).map(|s| vec![Dim::Known(s.len()), Dim::Unknown]);
                vec![Some(ValueType::new(DType::I64, s))]
            }
            IndexOp::OneHot { axis } => {
                let depth = match cst(1).and_then(|t| t.to_f64_vec().ok()).as_deref() {
                    Some([d]) if *d >= 0.0 && *d < 1e15 => Dim::Known(*d as usize),
                    _ => Dim::Unknown,
                };
                let s = shape(0).and_then(|mut s| {
                    let ax = norm_axis(*axis, s.len() + 1)?;
                    s.insert(ax, depth);
                    Some(s)
                });
                vec![dt(2).map(|d| ValueType::new(d, s))]
            }
            IndexOp::Compress { axis } => {
                let count = cst(1)
                    .and_then(|t| t.as_slice::<bool>())
                    .map(|v| Dim::Known(v.iter().filter(|b| **b).count()))
                    .unwrap_or(Dim::Unknown);
                let s = match axis {
                    None => Some(vec![count]),
                    Some(a) => shape(0).and_then(|mut s| {
                        let ax = norm_axis(*a, s.len())?;
                        s[ax] = count;
                        Some(s)
                    }),
                };
                vec![dt(0).map(|d| ValueType::new(d, s))]
            }
            IndexOp::Unique { axis, .. } => {
                let (ys, inv) = match axis {
                    None => (
                        Some(vec![Dim::Unknown]),
                        shape(0).map(|s| vec![s.iter().fold(Dim::Known(1), |a, d| a.mul(d))]),
                    ),
                    Some(a) => match shape(0) {
                        Some(mut s) => match norm_axis(*a, s.len()) {
                            Some(ax) => {
                                let n = s[ax].clone();
                                s[ax] = Dim::Unknown;
                                (Some(s), Some(vec![n]))
                            }
                            None => (None, None),
                        },
                        None => (None, None),
                    },
                };
                let u = Some(vec![Dim::Unknown]);
                vec![
                    dt(0).map(|d| ValueType::new(d, ys)),
                    Some(ValueType::new(DType::I64, u.clone())),
                    Some(ValueType::new(DType::I64, inv)),
                    Some(ValueType::new(DType::I64, u)),
                ]
            }
            IndexOp::Einsum { equation } => {
                let shapes: Option<Vec<Shape>> = (0..types.len()).map(shape).collect();
                let s = shapes.and_then(|s| einsum_shape(equation, &s));
                vec![dt(0).map(|d| ValueType::new(d, s))]
            }
            IndexOp::SpaceToDepth { blocksize, .. } | IndexOp::DepthToSpace { blocksize, .. } => {
                let b = Dim::Known(*blocksize);
                let bb = Dim::Known(blocksize.saturating_mul(*blocksize));
                let s = shape(0).and_then(|s| match s.as_slice() {
                    [n, c, h, w] => Some(if matches!(self, IndexOp::SpaceToDepth { .. }) {
                        vec![n.clone(), c.mul(&bb), h.div(&b), w.div(&b)]
                    } else {
                        vec![n.clone(), c.div(&bb), h.mul(&b), w.mul(&b)]
                    }),
                    _ => None,
                });
                vec![dt(0).map(|d| ValueType::new(d, s))]
            }
            IndexOp::CenterCropPad { axes } => {
                let s = match (shape(0), cst_ints(1)) {
                    (Some(mut s), Some(target)) => {
                        let axes: Vec<i64> = if axes.is_empty() {
                            (0..s.len() as i64).collect()
                        } else {
                            axes.clone()
                        };
                        let mut ok = axes.len() == target.len();
                        for (a, t) in axes.iter().zip(&target) {
                            match (norm_axis(*a, s.len()), usize::try_from(*t)) {
                                (Some(ax), Ok(t)) => s[ax] = Dim::Known(t),
                                _ => ok = false,
                            }
                        }
                        ok.then_some(s)
                    }
                    _ => None,
                };
                vec![dt(0).map(|d| ValueType::new(d, s))]
            }
            IndexOp::Col2Im { .. } => {
                let s = match (shape(0), cst_ints(1), cst_ints(2)) {
                    (Some(x), Some(img), Some(block)) if x.len() == 3 => {
                        let bl = block.iter().try_fold(1usize, |a, &b| {
                            usize::try_from(b).ok().and_then(|b| a.checked_mul(b))
                        });
                        match bl {
                            Some(bl) if bl > 0 => {
                                let mut s = vec![x[0].clone(), x[1].div(&Dim::Known(bl))];
                                let dims: Option<Vec<Dim>> = img
                                    .iter()
                                    .map(|&d| usize::try_from(d).map(Dim::Known).ok())
                                    .collect();
                                dims.map(|d| {
                                    s.extend(d);
                                    s
                                })
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                };
                vec![dt(0).map(|d| ValueType::new(d, s))]
            }
            IndexOp::EyeLike { dtype, .. } => {
                vec![ty(0).map(|t| ValueType::new(dtype.unwrap_or(t.dtype), t.shape.clone()))]
            }
            IndexOp::Det => {
                let s = shape(0).and_then(|s| (s.len() >= 2).then(|| s[..s.len() - 2].to_vec()));
                vec![dt(0).map(|d| ValueType::new(d, s))]
            }
        };
        out.resize(num_outputs.max(out.len()), None);
        out.truncate(num_outputs.max(1));
        Ok(out)
    }
}

fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    if axis < -r || axis >= r {
        return None;
    }
    Some(if axis < 0 { axis + r } else { axis } as usize)
}

/// Output shape of an einsum equation over operand shapes (`None` when it
/// cannot be worked out statically).
fn einsum_shape(equation: &str, shapes: &[Shape]) -> Option<Shape> {
    let eq: String = equation.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    if terms.len() != shapes.len() {
        return None;
    }
    let mut dims: std::collections::BTreeMap<char, Dim> = Default::default();
    let mut counts: std::collections::BTreeMap<char, usize> = Default::default();
    let mut ell: Option<Shape> = None;
    for (t, s) in terms.iter().zip(shapes) {
        let letters: Vec<char> = t.replace("...", "").chars().collect();
        let has_ell = t.contains("...");
        if s.len() < letters.len() || (!has_ell && s.len() != letters.len()) {
            return None;
        }
        let n_ell = s.len() - letters.len();
        let pre = t
            .find("...")
            .map(|p| t[..p].chars().count())
            .unwrap_or(letters.len());
        if has_ell {
            let e = s[pre..pre + n_ell].to_vec();
            ell = Some(match ell {
                None => e,
                Some(prev) => crate::broadcast_shapes(&prev, &e)?,
            });
        }
        for (k, c) in letters.iter().enumerate() {
            let d = if k < pre { &s[k] } else { &s[k + n_ell] };
            *counts.entry(*c).or_default() += 1;
            let e = dims.entry(*c).or_insert(Dim::Known(1));
            if matches!(e, Dim::Known(1)) {
                *e = d.clone();
            }
        }
    }
    let ell = ell.unwrap_or_default();
    let mut out = Vec::new();
    match rhs {
        Some(r) => {
            let pre = r.find("...");
            for (k, c) in r.replace("...", "").chars().enumerate() {
                if pre == Some(k) {
                    out.extend(ell.iter().cloned());
                }
                out.push(dims.get(&c)?.clone());
            }
            if let Some(p) = pre {
                if p >= r.replace("...", "").chars().count() {
                    out.extend(ell.iter().cloned());
                }
            }
        }
        None => {
            out.extend(ell.iter().cloned());
            for (c, n) in &counts {
                if *n == 1 {
                    out.push(dims.get(c)?.clone());
                }
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::known_shape;

    fn vt(dtype: DType, dims: &[usize]) -> Option<ValueType> {
        Some(ValueType::new(dtype, Some(known_shape(dims))))
    }

    fn shape_of(t: &Option<ValueType>) -> Option<Shape> {
        t.as_ref().and_then(|t| t.shape.clone())
    }

    #[test]
    fn infer_shapes() {
        let op = IndexOp::GatherND { batch_dims: 1 };
        let r = op
            .infer(
                &[vt(DType::F32, &[2, 3, 4]), vt(DType::I64, &[2, 5, 1])],
                &[],
                1,
            )
            .unwrap();
        assert_eq!(shape_of(&r[0]), Some(known_shape(&[2, 5, 4])));
        assert!(op
            .infer(&[vt(DType::F32, &[2]), vt(DType::I64, &[2, 5, 3])], &[], 1)
            .is_err());

        let k = Tensor::vector(vec![2i64]);
        let r = IndexOp::TopK {
            axis: -1,
            largest: true,
        }
        .infer(
            &[vt(DType::F32, &[3, 4]), vt(DType::I64, &[1])],
            &[None, Some(&k)],
            2,
        )
        .unwrap();
        assert_eq!(shape_of(&r[0]), Some(known_shape(&[3, 2])));
        assert_eq!(r[1].as_ref().map(|t| t.dtype), Some(DType::I64));

        let depth = Tensor::scalar(10.0f32);
        let r = IndexOp::OneHot { axis: 1 }
            .infer(
                &[
                    vt(DType::I64, &[2, 3]),
                    vt(DType::F32, &[]),
                    vt(DType::I32, &[2]),
                ],
                &[None, Some(&depth), None],
                1,
            )
            .unwrap();
        assert_eq!(r[0], vt(DType::I32, &[2, 10, 3]));

        let r = IndexOp::NonZero
            .infer(&[vt(DType::F32, &[2, 3])], &[], 1)
            .unwrap();
        assert_eq!(shape_of(&r[0]), Some(vec![Dim::Known(2), Dim::Unknown]));

        let r = IndexOp::Einsum {
            equation: "bij,bjk->bik".into(),
        }
        .infer(
            &[vt(DType::F32, &[5, 2, 3]), vt(DType::F32, &[5, 3, 4])],
            &[],
            1,
        )
        .unwrap();
        assert_eq!(shape_of(&r[0]), Some(known_shape(&[5, 2, 4])));
        let r = IndexOp::Einsum {
            equation: "...ii->...i".into(),
        }
        .infer(&[vt(DType::F32, &[7, 3, 3])], &[], 1)
        .unwrap();
        assert_eq!(shape_of(&r[0]), Some(known_shape(&[7, 3])));
        let r = IndexOp::Einsum {
            equation: "ji,j".into(),
        }
        .infer(&[vt(DType::F32, &[2, 3]), vt(DType::F32, &[2])], &[], 1)
        .unwrap();
        assert_eq!(shape_of(&r[0]), Some(known_shape(&[3])));

        let r = IndexOp::DepthToSpace {
            blocksize: 2,
            crd: false,
        }
        .infer(&[vt(DType::F32, &[1, 8, 2, 3])], &[], 1)
        .unwrap();
        assert_eq!(shape_of(&r[0]), Some(known_shape(&[1, 2, 4, 6])));

        let r = IndexOp::Unique {
            axis: None,
            sorted: true,
        }
        .infer(&[vt(DType::F32, &[2, 3])], &[], 4)
        .unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(shape_of(&r[2]), Some(known_shape(&[6])));

        let r = IndexOp::Det
            .infer(&[vt(DType::F64, &[4, 3, 3])], &[], 1)
            .unwrap();
        assert_eq!(r[0], vt(DType::F64, &[4]));

        let img = Tensor::vector(vec![5i64, 5]);
        let blk = Tensor::vector(vec![1i64, 5]);
        let r = IndexOp::Col2Im {
            dilations: vec![],
            pads: vec![],
            strides: vec![],
        }
        .infer(
            &[vt(DType::F32, &[1, 5, 5]), None, None],
            &[None, Some(&img), Some(&blk)],
            1,
        )
        .unwrap();
        assert_eq!(shape_of(&r[0]), Some(known_shape(&[1, 1, 5, 5])));

        let r = IndexOp::EyeLike {
            dtype: Some(DType::I32),
            k: 0,
        }
        .infer(&[vt(DType::F32, &[2, 2])], &[], 1)
        .unwrap();
        assert_eq!(r[0], vt(DType::I32, &[2, 2]));
        // Unknown inputs give unknown outputs, not errors.
        let r = IndexOp::Compress { axis: Some(0) }
            .infer(&[None, None], &[], 1)
            .unwrap();
        assert_eq!(r, vec![None]);
    }
}
