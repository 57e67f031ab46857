//! GatherND, ScatterND, ScatterElements (and Scatter), TensorScatter.

use super::{index_values, output_len, resolve_index, with_num, Num};
use crate::util::{normalize_axis, strides};
use crate::{invalid, unsupported, Result};
use kiln_ir::{map_data, BinaryOp, Tensor, TensorData};

/// For every index tuple of `indices` (last dim `k`), the flat offset of the
/// addressed slice in `data` (the leading `batch_dims` dims are shared).
/// Returns (offsets, slice length, shape of the index grid).
fn nd_offsets(
    op: &str,
    data_shape: &[usize],
    indices: &Tensor,
    batch_dims: usize,
) -> Result<(Vec<usize>, usize, Vec<usize>)> {
    let ishape = indices.shape();
    let q = ishape.len();
    let r = data_shape.len();
    if q < 1 {
        return Err(invalid!("{op}: indices must have rank >= 1"));
    }
    let k = ishape[q - 1];
    if batch_dims >= q || batch_dims >= r {
        return Err(invalid!(
            "{op}: batch_dims {batch_dims} must be less than the ranks of data ({r}) and indices ({q})"
        ));
    }
    if k > r - batch_dims {
        return Err(invalid!(
            "{op}: indices' last dimension {k} exceeds the data rank {r} minus batch_dims {batch_dims}"
        ));
    }
    if data_shape[..batch_dims] != ishape[..batch_dims] {
        return Err(invalid!(
            "{op}: the batch dims of data {data_shape:?} and indices {ishape:?} differ"
        ));
    }
    let idx = index_values(op, indices, "indices")?;
    let ds = strides(data_shape);
    let slice: usize = data_shape[batch_dims + k..].iter().product();
    let batch_stride: usize = data_shape[batch_dims..].iter().product();
    let batches: usize = ishape[..batch_dims].iter().product();
    let per_batch: usize = ishape[batch_dims..q - 1].iter().product();
    let mut offsets = Vec::with_capacity(batches * per_batch);
    if k == 0 {
        for b in 0..batches {
            for _ in 0..per_batch {
                offsets.push(b * batch_stride);
            }
        }
    } else {
        for (n, tuple) in idx.chunks(k).enumerate() {
            let b = n.checked_div(per_batch).unwrap_or(0);
            let mut off = b * batch_stride;
            for (j, &i) in tuple.iter().enumerate() {
                off += resolve_index(op, i, data_shape[batch_dims + j])? * ds[batch_dims + j];
            }
            offsets.push(off);
        }
    }
    Ok((offsets, slice, ishape[..q - 1].to_vec()))
}

pub fn gather_nd(data: &Tensor, indices: &Tensor, batch_dims: usize) -> Result<Tensor> {
    let (offsets, slice, grid) = nd_offsets("GatherND", data.shape(), indices, batch_dims)?;
    let k = indices.shape().last().copied().unwrap_or(0);
    let mut shape = grid;
    shape.extend_from_slice(&data.shape()[batch_dims + k..]);
    output_len("GatherND", &shape)?;
    let out = map_data!(data.data(), v => {
        let mut o = Vec::with_capacity(offsets.len() * slice);
        for &off in &offsets {
            o.extend_from_slice(&v[off..off + slice]);
        }
        o
    });
    crate::util::tensor(shape, out)
}

/// Applies `updates` (one element per plan entry, in order) onto a copy of
/// `data` at the flat offsets of `plan`.
fn apply(
    op: &str,
    data: &Tensor,
    updates: &Tensor,
    plan: &[usize],
    reduction: Option<BinaryOp>,
) -> Result<Tensor> {
    if data.dtype() != updates.dtype() {
        return Err(invalid!(
            "{op}: updates are {} but data is {}",
            updates.dtype(),
            data.dtype()
        ));
    }
    if updates.len() != plan.len() {
        return Err(invalid!(
            "{op}: updates shape {:?} does not match the indexed positions ({})",
            updates.shape(),
            plan.len()
        ));
    }
    let mut out = data.clone();
    match reduction {
        None => {
            let od = out.data_mut();
            macro_rules! put {
                ($($var:ident),*) => {
                    match (od, updates.data()) {
                        $((TensorData::$var(o), TensorData::$var(u)) => {
                            for (x, &p) in u.iter().zip(plan) {
                                o[p] = x.clone();
                            }
                        })*
                        (TensorData::Bits(_, o), TensorData::Bits(_, u)) => {
                            for (x, &p) in u.iter().zip(plan) {
                                o[p] = *x;
                            }
                        }
                        _ => return Err(invalid!("{op}: dtype mismatch")),
                    }
                };
            }
            put!(F32, F64, F16, BF16, I8, I16, I32, I64, U8, U16, U32, U64, Bool, String);
        }
        Some(r) => {
            fn red<T: Num>(o: &mut [T], u: &[T], plan: &[usize], r: BinaryOp) -> Result<()> {
                let f: fn(T, T) -> T = match r {
                    BinaryOp::Add => |a, b| a.add(b),
                    BinaryOp::Mul => |a, b| a.mul(b),
                    BinaryOp::Max => |a, b| if b > a { b } else { a },
                    BinaryOp::Min => |a, b| if b < a { b } else { a },
                    r => return Err(invalid!("reduction {r:?} is not a scatter reduction")),
                };
                for (&x, &p) in u.iter().zip(plan) {
                    o[p] = f(o[p], x);
                }
                Ok(())
            }
            let u = updates.data();
            let dt = out.dtype();
            with_num!(out.data_mut(), o => {
                let uv = kiln_ir::Element::slice(u).ok_or_else(|| invalid!("{op}: dtype mismatch"))?;
                red(o, uv, plan, r)?
            }, return Err(unsupported!("{op} with reduction on {dt} tensors")));
        }
    }
    Ok(out)
}

pub fn scatter_nd(
    data: &Tensor,
    indices: &Tensor,
    updates: &Tensor,
    reduction: Option<BinaryOp>,
) -> Result<Tensor> {
    let op = "ScatterND";
    let (offsets, slice, grid) = nd_offsets(op, data.shape(), indices, 0)?;
    let k = indices.shape().last().copied().unwrap_or(0);
    let mut want = grid;
    want.extend_from_slice(&data.shape()[k..]);
    if updates.shape() != want.as_slice() {
        return Err(invalid!(
            "{op}: updates shape {:?} should be {want:?}",
            updates.shape()
        ));
    }
    // Duplicate indices without a reduction are applied in order (last wins).
    let plan: Vec<usize> = offsets.iter().flat_map(|&o| o..o + slice).collect();
    apply(op, data, updates, &plan, reduction)
}

pub fn scatter_elements(
    op: &str,
    data: &Tensor,
    indices: &Tensor,
    updates: &Tensor,
    axis: i64,
    reduction: Option<BinaryOp>,
) -> Result<Tensor> {
    let ds = data.shape();
    let r = ds.len();
    let ax = normalize_axis(axis, r).map_err(|e| invalid!("{op}: {e}"))?;
    let ishape = indices.shape();
    if ishape != updates.shape() {
        return Err(invalid!(
            "{op}: indices {ishape:?} and updates {:?} must have the same shape",
            updates.shape()
        ));
    }
    if ishape.len() != r {
        return Err(invalid!(
            "{op}: indices rank {} differs from data rank {r}",
            ishape.len()
        ));
    }
    for d in 0..r {
        if d != ax && ishape[d] > ds[d] {
            return Err(invalid!(
                "{op}: indices shape {ishape:?} exceeds data shape {ds:?} on axis {d}"
            ));
        }
    }
    let idx = index_values(op, indices, "indices")?;
    let dstr = strides(ds);
    let mut plan = Vec::with_capacity(idx.len());
    let mut counter = vec![0usize; r];
    for &i in &idx {
        let mut off = 0;
        for d in 0..r {
            let c = if d == ax {
                resolve_index(op, i, ds[d])?
            } else {
                counter[d]
            };
            off += c * dstr[d];
        }
        plan.push(off);
        for d in (0..r).rev() {
            counter[d] += 1;
            if counter[d] < ishape[d] {
                break;
            }
            counter[d] = 0;
        }
    }
    apply(op, data, updates, &plan, reduction)
}

pub fn tensor_scatter(
    cache: &Tensor,
    update: &Tensor,
    write_indices: Option<&Tensor>,
    axis: i64,
    circular: bool,
) -> Result<Tensor> {
    let op = "TensorScatter";
    let cs = cache.shape();
    let us = update.shape();
    let r = cs.len();
    let ax = normalize_axis(axis, r).map_err(|e| invalid!("{op}: {e}"))?;
    if ax == 0 {
        return Err(invalid!("{op}: axis must not be the batch axis 0"));
    }
    if us.len() != r
        || (0..r).any(|d| {
            if d == ax {
                us[d] > cs[d]
            } else {
                us[d] != cs[d]
            }
        })
    {
        return Err(invalid!(
            "{op}: update shape {us:?} does not fit cache shape {cs:?} on axis {ax}"
        ));
    }
    let batch = cs[0];
    let wi = match write_indices {
        Some(t) => {
            let v = index_values(op, t, "write_indices")?;
            if v.len() != batch {
                return Err(invalid!(
                    "{op}: write_indices has {} values for a batch of {batch}",
                    v.len()
                ));
            }
            v
        }
        None => vec![0; batch],
    };
    let max_len = cs[ax];
    let seq = us[ax];
    let inner: usize = cs[ax + 1..].iter().product();
    let outer: usize = cs[..ax].iter().product();
    let per_batch = outer.checked_div(batch).unwrap_or(0);
    let mut plan = Vec::with_capacity(update.len());
    for o in 0..outer {
        let b = o.checked_div(per_batch).unwrap_or(0);
        let start = wi[b];
        for s in 0..seq {
            let mut pos = start
                .checked_add(s as i64)
                .ok_or_else(|| invalid!("{op}: write index overflows"))?;
            if circular && max_len > 0 {
                pos = pos.rem_euclid(max_len as i64);
            }
            if pos < 0 || pos as usize >= max_len {
                return Err(invalid!(
                    "{op}: write position {pos} is outside the cache length {max_len}"
                ));
            }
            let base = (o * max_len + pos as usize) * inner;
            plan.extend(base..base + inner);
        }
    }
    apply(op, cache, update, &plan, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<T: kiln_ir::Element>(shape: &[usize], v: Vec<T>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    #[test]
    fn gather_nd_cases() {
        let data = t(&[2, 2], vec![0i32, 1, 2, 3]);
        let r = gather_nd(&data, &t(&[2, 2], vec![0i64, 0, 1, 1]), 0).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[0, 3]);
        let r = gather_nd(&data, &t(&[2, 1], vec![1i64, 0]), 0).unwrap();
        assert_eq!(r.shape(), &[2, 2]);
        assert_eq!(r.as_slice::<i32>().unwrap(), &[2, 3, 0, 1]);
        // batch_dims = 1
        let data = t(&[2, 2, 2], (0..8).collect::<Vec<i32>>());
        let r = gather_nd(&data, &t(&[2, 1], vec![1i64, 0]), 1).unwrap();
        assert_eq!(r.shape(), &[2, 2]);
        assert_eq!(r.as_slice::<i32>().unwrap(), &[2, 3, 4, 5]);
        // negative index, strings
        let s = t(&[3], vec!["a".to_string(), "b".into(), "c".into()]);
        let r = gather_nd(&s, &t(&[1, 1], vec![-1i64]), 0).unwrap();
        assert_eq!(r.as_slice::<String>().unwrap(), &["c".to_string()]);
        assert!(gather_nd(&s, &t(&[1, 1], vec![3i64]), 0).is_err());
        assert!(gather_nd(&s, &t(&[1, 2], vec![0i64, 0]), 0).is_err());
        assert!(gather_nd(&s, &t(&[1, 1], vec![0i64]), 1).is_err());
        // empty indices grid
        let r = gather_nd(&s, &t(&[0, 1], Vec::<i64>::new()), 0).unwrap();
        assert_eq!(r.shape(), &[0]);
    }

    #[test]
    fn scatter_nd_cases() {
        let data = t(&[4], vec![1.0f32, 2., 3., 4.]);
        let idx = t(&[2, 1], vec![1i64, 3]);
        let up = t(&[2], vec![10.0f32, 20.]);
        let r = scatter_nd(&data, &idx, &up, None).unwrap();
        assert_eq!(r.as_slice::<f32>().unwrap(), &[1., 10., 3., 20.]);
        let idx = t(&[2, 1], vec![1i64, 1]);
        let r = scatter_nd(&data, &idx, &up, Some(BinaryOp::Add)).unwrap();
        assert_eq!(r.as_slice::<f32>().unwrap(), &[1., 32., 3., 4.]);
        let r = scatter_nd(&data, &idx, &up, Some(BinaryOp::Mul)).unwrap();
        assert_eq!(r.as_slice::<f32>().unwrap(), &[1., 400., 3., 4.]);
        let r = scatter_nd(&data, &idx, &up, Some(BinaryOp::Min)).unwrap();
        assert_eq!(r.as_slice::<f32>().unwrap(), &[1., 2., 3., 4.]);
        let r = scatter_nd(&data, &idx, &up, Some(BinaryOp::Max)).unwrap();
        assert_eq!(r.as_slice::<f32>().unwrap(), &[1., 20., 3., 4.]);
        // slice updates on 2-D data
        let data = t(&[2, 2], vec![0i64; 4]);
        let r = scatter_nd(
            &data,
            &t(&[1, 1], vec![-1i64]),
            &t(&[1, 2], vec![5i64, 6]),
            None,
        )
        .unwrap();
        assert_eq!(r.as_slice::<i64>().unwrap(), &[0, 0, 5, 6]);
        // bad shapes / dtypes
        assert!(scatter_nd(
            &data,
            &t(&[1, 1], vec![0i64]),
            &t(&[2], vec![5i64, 6]),
            None
        )
        .is_err());
        assert!(scatter_nd(
            &data,
            &t(&[1, 1], vec![0i64]),
            &t(&[1, 2], vec![5i32, 6]),
            None
        )
        .is_err());
        let b = t(&[2], vec![true, false]);
        assert!(scatter_nd(
            &b,
            &t(&[1, 1], vec![0i64]),
            &t(&[1], vec![true]),
            Some(BinaryOp::Add)
        )
        .is_err());
        let r = scatter_nd(&b, &t(&[1, 1], vec![1i64]), &t(&[1], vec![true]), None).unwrap();
        assert_eq!(r.as_slice::<bool>().unwrap(), &[true, true]);
    }

    #[test]
    fn scatter_elements_cases() {
        let data = t(&[3, 3], vec![0.0f32; 9]);
        let idx = t(&[2, 3], vec![1i64, 0, 2, 0, 2, 1]);
        let up = t(&[2, 3], vec![1.0f32, 1.1, 1.2, 2.0, 2.1, 2.2]);
        let r = scatter_elements("S", &data, &idx, &up, 0, None).unwrap();
        assert_eq!(
            r.as_slice::<f32>().unwrap(),
            &[2.0, 1.1, 0.0, 1.0, 0.0, 2.2, 0.0, 2.1, 1.2]
        );
        let data = t(&[1, 5], vec![1.0f32, 2., 3., 4., 5.]);
        let idx = t(&[1, 2], vec![1i64, -2]);
        let up = t(&[1, 2], vec![1.1f32, 2.1]);
        let r = scatter_elements("S", &data, &idx, &up, -1, None).unwrap();
        assert_eq!(r.as_slice::<f32>().unwrap(), &[1., 1.1, 3., 2.1, 5.]);
        let idx = t(&[1, 2], vec![1i64, 1]);
        let r = scatter_elements("S", &data, &idx, &up, 1, Some(BinaryOp::Add)).unwrap();
        assert_eq!(r.as_slice::<f32>().unwrap(), &[1., 5.2, 3., 4., 5.]);
        assert!(scatter_elements("S", &data, &t(&[1, 2], vec![5i64, 0]), &up, 1, None).is_err());
        assert!(scatter_elements("S", &data, &idx, &up, 2, None).is_err());
        assert!(scatter_elements("S", &data, &t(&[2], vec![0i64, 0]), &up, 1, None).is_err());
    }

    #[test]
    fn tensor_scatter_cases() {
        let cache = t(&[2, 3, 1], vec![0i32; 6]);
        let up = t(&[2, 2, 1], vec![1i32, 2, 3, 4]);
        let wi = t(&[2], vec![1i64, 2]);
        let r = tensor_scatter(&cache, &up, Some(&wi), -2, true).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[0, 1, 2, 4, 0, 3]);
        assert!(tensor_scatter(&cache, &up, Some(&wi), -2, false).is_err());
        let r = tensor_scatter(&cache, &up, None, 1, false).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[1, 2, 0, 3, 4, 0]);
        assert!(tensor_scatter(&cache, &up, None, 0, false).is_err());
    }
}
