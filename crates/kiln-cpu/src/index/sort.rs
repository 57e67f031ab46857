//! TopK, Unique, NonZero.

use super::{new_tensor, output_len, scalar_index, total_cmp};
use crate::util::normalize_axis;
use crate::{invalid, unsupported, Result};
use kiln_ir::{with_data, Tensor};
use std::cmp::Ordering;

/// Sorting compares elements by value, which packed low-precision types
/// (held as raw bit patterns) do not support here.
fn refuse_bits(op: &str, x: &Tensor) -> Result<()> {
    if matches!(x.data(), kiln_ir::TensorData::Bits(..)) {
        return Err(unsupported!("{op} on {} tensors", x.dtype()));
    }
    Ok(())
}

/// Splits `shape` at `axis` into (outer, dim, inner).
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

pub fn top_k(x: &Tensor, k: &Tensor, axis: i64, largest: bool) -> Result<Vec<Tensor>> {
    let op = "TopK";
    refuse_bits(op, x)?;
    let shape = x.shape();
    if shape.is_empty() {
        return Err(invalid!("{op}: input must have rank >= 1"));
    }
    let ax = normalize_axis(axis, shape.len()).map_err(|e| invalid!("{op}: {e}"))?;
    let kv = scalar_index(op, k, "K")?;
    let (outer, dim, inner) = split_at_axis(shape, ax);
    let k = usize::try_from(kv)
        .ok()
        .filter(|&k| k <= dim)
        .ok_or_else(|| invalid!("{op}: k = {kv} must be in [0, {dim}] (axis {ax} of {shape:?})"))?;
    let mut oshape = shape.to_vec();
    oshape[ax] = k;
    output_len(op, &oshape)?;
    let mut order: Vec<usize> = Vec::with_capacity(outer * k * inner);
    let mut lane: Vec<usize> = Vec::with_capacity(dim);
    // Flat source offsets of the selected elements, in output order.
    let mut picks = vec![0usize; outer * k * inner];
    with_data!(x.data(), v => {
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| &v[(o * dim + j) * inner + i];
                lane.clear();
                lane.extend(0..dim);
                let cmp = |a: &usize, b: &usize| {
                    let c = total_cmp(at(*a), at(*b));
                    let c = if largest { c.reverse() } else { c };
                    c.then(a.cmp(b))
                };
                if k < dim {
                    if k > 0 {
                        lane.select_nth_unstable_by(k - 1, cmp);
                    }
                    lane.truncate(k);
                }
                lane.sort_by(cmp);
                for (j, &src) in lane.iter().enumerate() {
                    picks[(o * k + j) * inner + i] = (o * dim + src) * inner + i;
                }
            }
        }
    });
    order.extend(picks.iter().map(|p| (p / inner) % dim.max(1)));
    let values = x.data().gather(picks.iter().copied());
    let indices: Vec<i64> = order.into_iter().map(|j| j as i64).collect();
    Ok(vec![
        crate::util::tensor(oshape.clone(), values)?,
        new_tensor(oshape, indices)?,
    ])
}

/// Compares rows `a` and `b` (each `len` elements at `a*len`) lexicographically.
fn cmp_rows<T: PartialOrd>(v: &[T], len: usize, a: usize, b: usize) -> Ordering {
    for j in 0..len {
        let c = total_cmp(&v[a * len + j], &v[b * len + j]);
        if c != Ordering::Equal {
            return c;
        }
    }
    Ordering::Equal
}

pub fn unique(
    x: &Tensor,
    axis: Option<i64>,
    sorted: bool,
    num_outputs: usize,
) -> Result<Vec<Tensor>> {
    let op = "Unique";
    refuse_bits(op, x)?;
    let shape = x.shape();
    // View the input as `outer × n × inner`, comparing slices along the axis.
    let (ax, outer, n, inner) = match axis {
        None => (None, 1, x.len(), 1),
        Some(a) => {
            let ax = normalize_axis(a, shape.len()).map_err(|e| invalid!("{op}: {e}"))?;
            let (o, d, i) = split_at_axis(shape, ax);
            (Some(ax), o, d, i)
        }
    };
    // Move the axis first: row r holds slice r, `outer*inner` elements.
    let row_len = outer * inner;
    let rows_of =
        |r: usize| (0..outer).flat_map(move |o| (0..inner).map(move |i| (o * n + r) * inner + i));
    let moved = x.data().gather((0..n).flat_map(rows_of));
    // Stable sort of the rows, then groups of equal rows.
    let mut perm: Vec<usize> = (0..n).collect();
    with_data!(&moved, v => perm.sort_by(|a, b| cmp_rows(v, row_len, *a, *b)));
    let mut groups: Vec<(usize, usize)> = Vec::new(); // (first index, count)
    let mut inverse = vec![0usize; n];
    with_data!(&moved, v => {
        for (p, &r) in perm.iter().enumerate() {
            let new_group = p == 0 || cmp_rows(v, row_len, perm[p - 1], r) != Ordering::Equal;
            if new_group {
                groups.push((r, 1));
            } else if let Some(g) = groups.last_mut() {
                g.1 += 1;
                g.0 = g.0.min(r);
            }
            inverse[r] = groups.len() - 1;
        }
    });
    // Group order: sorted (as found) or by first occurrence.
    let mut gorder: Vec<usize> = (0..groups.len()).collect();
    if !sorted {
        gorder.sort_by_key(|&g| groups[g].0);
    }
    let mut rank = vec![0usize; groups.len()];
    for (pos, &g) in gorder.iter().enumerate() {
        rank[g] = pos;
    }
    let u = groups.len();
    let firsts: Vec<usize> = gorder.iter().map(|&g| groups[g].0).collect();
    // Y: the first occurrence of each group, moved back into place.
    let ydata = match ax {
        None => x.data().gather(firsts.iter().copied()),
        Some(_) => x.data().gather((0..outer).flat_map(|o| {
            let f = &firsts;
            f.iter()
                .flat_map(move |&r| (0..inner).map(move |i| (o * n + r) * inner + i))
        })),
    };
    let yshape = match ax {
        None => vec![u],
        Some(a) => {
            let mut s = shape.to_vec();
            s[a] = u;
            s
        }
    };
    let mut outs = vec![crate::util::tensor(yshape, ydata)?];
    if num_outputs > 1 {
        outs.push(new_tensor(
            vec![u],
            firsts.iter().map(|&f| f as i64).collect(),
        )?);
    }
    if num_outputs > 2 {
        let inv: Vec<i64> = inverse.iter().map(|&g| rank[g] as i64).collect();
        outs.push(new_tensor(vec![n], inv)?);
    }
    if num_outputs > 3 {
        let counts: Vec<i64> = gorder.iter().map(|&g| groups[g].1 as i64).collect();
        outs.push(new_tensor(vec![u], counts)?);
    }
    Ok(outs)
}

pub fn non_zero(x: &Tensor) -> Result<Tensor> {
    let shape = x.shape();
    let rank = shape.len();
    fn positions<T: PartialEq + Default>(v: &[T]) -> Vec<usize> {
        let zero = T::default();
        v.iter()
            .enumerate()
            .filter(|(_, e)| **e != zero)
            .map(|(i, _)| i)
            .collect()
    }
    let nz: Vec<usize> = with_data!(x.data(), v => positions(v));
    let strides = crate::util::strides(shape);
    let m = nz.len();
    let mut out = vec![0i64; rank * m];
    for (j, &flat) in nz.iter().enumerate() {
        let mut rem = flat;
        for d in 0..rank {
            out[d * m + j] = (rem / strides[d]) as i64;
            rem %= strides[d];
        }
    }
    new_tensor(vec![rank, m], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<T: kiln_ir::Element>(shape: &[usize], v: Vec<T>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    #[test]
    fn top_k_cases() {
        let x = t(&[3, 4], (0..12).map(|v| v as f32).collect());
        let k = t(&[1], vec![3i64]);
        let r = top_k(&x, &k, 1, true).unwrap();
        assert_eq!(r[0].shape(), &[3, 3]);
        assert_eq!(
            r[0].as_slice::<f32>().unwrap(),
            &[3., 2., 1., 7., 6., 5., 11., 10., 9.]
        );
        assert_eq!(
            r[1].as_slice::<i64>().unwrap(),
            &[3, 2, 1, 3, 2, 1, 3, 2, 1]
        );
        let r = top_k(&x, &k, -1, false).unwrap();
        assert_eq!(
            r[1].as_slice::<i64>().unwrap(),
            &[0, 1, 2, 0, 1, 2, 0, 1, 2]
        );
        // axis 0, ties go to the lower index
        let x = t(&[3, 1], vec![1i32, 2, 2]);
        let r = top_k(&x, &t(&[1], vec![2i64]), 0, true).unwrap();
        assert_eq!(r[1].as_slice::<i64>().unwrap(), &[1, 2]);
        let r = top_k(&x, &t(&[1], vec![2i64]), 0, false).unwrap();
        assert_eq!(r[1].as_slice::<i64>().unwrap(), &[0, 1]);
        // NaN is the largest
        let x = t(&[3], vec![1.0f32, f32::NAN, 3.0]);
        let r = top_k(&x, &t(&[1], vec![1i64]), 0, true).unwrap();
        assert_eq!(r[1].as_slice::<i64>().unwrap(), &[1]);
        let r = top_k(&x, &t(&[1], vec![0i64]), 0, true).unwrap();
        assert_eq!(r[0].shape(), &[0]);
        assert!(top_k(&x, &t(&[1], vec![4i64]), 0, true).is_err());
        assert!(top_k(&x, &t(&[1], vec![-1i64]), 0, true).is_err());
        assert!(top_k(&x, &t(&[1], vec![1i64]), 1, true).is_err());
    }

    #[test]
    fn unique_cases() {
        let x = t(&[6], vec![2.0f32, 1., 1., 3., 4., 3.]);
        let r = unique(&x, None, true, 4).unwrap();
        assert_eq!(r[0].as_slice::<f32>().unwrap(), &[1., 2., 3., 4.]);
        assert_eq!(r[1].as_slice::<i64>().unwrap(), &[1, 0, 3, 4]);
        assert_eq!(r[2].as_slice::<i64>().unwrap(), &[1, 0, 0, 2, 3, 2]);
        assert_eq!(r[3].as_slice::<i64>().unwrap(), &[2, 1, 2, 1]);
        let r = unique(&x, None, false, 4).unwrap();
        assert_eq!(r[0].as_slice::<f32>().unwrap(), &[2., 1., 3., 4.]);
        assert_eq!(r[1].as_slice::<i64>().unwrap(), &[0, 1, 3, 4]);
        assert_eq!(r[2].as_slice::<i64>().unwrap(), &[0, 1, 1, 2, 3, 2]);
        assert_eq!(r[3].as_slice::<i64>().unwrap(), &[1, 2, 2, 1]);
        // axis 0 rows
        let x = t(&[3, 3], vec![1i32, 0, 0, 1, 0, 0, 2, 3, 4]);
        let r = unique(&x, Some(0), true, 4).unwrap();
        assert_eq!(r[0].shape(), &[2, 3]);
        assert_eq!(r[0].as_slice::<i32>().unwrap(), &[1, 0, 0, 2, 3, 4]);
        assert_eq!(r[2].as_slice::<i64>().unwrap(), &[0, 0, 1]);
        // axis 1 columns
        let x = t(&[2, 3], vec![1i32, 0, 1, 2, 0, 2]);
        let r = unique(&x, Some(-1), true, 1).unwrap();
        assert_eq!(r[0].shape(), &[2, 2]);
        assert_eq!(r[0].as_slice::<i32>().unwrap(), &[0, 1, 0, 2]);
        assert!(unique(&x, Some(2), true, 1).is_err());
        let e = unique(&t(&[0], Vec::<f32>::new()), None, true, 4).unwrap();
        assert_eq!(e[0].shape(), &[0]);
        let s = t(&[3], vec!["b".to_string(), "a".into(), "b".into()]);
        let r = unique(&s, None, true, 1).unwrap();
        assert_eq!(
            r[0].as_slice::<String>().unwrap(),
            &["a".to_string(), "b".into()]
        );
    }

    #[test]
    fn non_zero_cases() {
        let x = t(&[2, 2], vec![1.0f32, 0., 1., 1.]);
        let r = non_zero(&x).unwrap();
        assert_eq!(r.shape(), &[2, 3]);
        assert_eq!(r.as_slice::<i64>().unwrap(), &[0, 1, 1, 0, 0, 1]);
        let r = non_zero(&t(&[3], vec![false, true, false])).unwrap();
        assert_eq!(r.as_slice::<i64>().unwrap(), &[1]);
        let r = non_zero(&Tensor::scalar(5i32)).unwrap();
        assert_eq!(r.shape(), &[0, 1]);
        let r = non_zero(&t(&[0, 2], Vec::<i8>::new())).unwrap();
        assert_eq!(r.shape(), &[2, 0]);
    }
}
