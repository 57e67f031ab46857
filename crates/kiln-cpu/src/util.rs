//! Small helpers shared by the kernels: axes, strides, broadcasting indices.

use crate::{invalid, Result};
use kiln_ir::Tensor;

/// Resolves a possibly negative axis against `rank` (ONNX accepts `[-rank, rank-1]`).
pub fn normalize_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    if axis < -r || axis >= r {
        return Err(invalid!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(if axis < 0 {
        (axis + r) as usize
    } else {
        axis as usize
    })
}

/// Row-major strides of `shape` (in elements).
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Numpy-style broadcast of concrete shapes, or an error naming both shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        *o = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(invalid!(
                "shapes {a:?} and {b:?} cannot be broadcast together"
            ));
        };
    }
    Ok(out)
}

/// For each element of `out_shape` (row-major), the flat index into a tensor of
/// shape `in_shape` broadcast to it. `in_shape` must broadcast to `out_shape`.
pub fn broadcast_indices(in_shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let rank = out_shape.len();
    let n: usize = out_shape.iter().product();
    let pad = rank - in_shape.len();
    let in_strides = strides(in_shape);
    // Stride 0 along broadcast axes.
    let eff: Vec<usize> = (0..rank)
        .map(|i| {
            if i < pad || in_shape[i - pad] == 1 {
                0
            } else {
                in_strides[i - pad]
            }
        })
        .collect();
    let mut idx = Vec::with_capacity(n);
    let mut counter = vec![0usize; rank];
    let mut flat = 0usize;
    for _ in 0..n {
        idx.push(flat);
        // Increment the multi-index, updating the flat offset incrementally.
        for ax in (0..rank).rev() {
            counter[ax] += 1;
            flat += eff[ax];
            if counter[ax] < out_shape[ax] {
                break;
            }
            flat -= eff[ax] * counter[ax];
            counter[ax] = 0;
        }
    }
    idx
}

/// Reads a shape-like input (shape, axes, pads, repeats) as i64 values.
pub fn i64_values(t: &Tensor, what: &str) -> Result<Vec<i64>> {
    t.to_i64_vec().map_err(|e| invalid!("{what}: {e}"))
}

/// An optional f32 input of exactly `shape` (a bias, a residual) as a
/// slice; an error naming it (`what`, e.g. `"Conv: bias B"`) when it has
/// another dtype or shape.
pub(crate) fn f32_of_shape<'a>(
    t: Option<&'a Tensor>,
    shape: &[usize],
    what: &str,
) -> Result<Option<&'a [f32]>> {
    let Some(t) = t else { return Ok(None) };
    t.as_slice::<f32>()
        .filter(|_| t.shape() == shape)
        .map(Some)
        .ok_or_else(|| {
            invalid!(
                "{what} must be f32 {shape:?}, got {} {:?}",
                t.dtype(),
                t.shape()
            )
        })
}

/// Builds a tensor, turning a shape/length mismatch into a kernel error.
pub fn tensor(shape: Vec<usize>, data: kiln_ir::TensorData) -> Result<Tensor> {
    Tensor::new(shape, data).map_err(|e| invalid!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_and_strides() {
        assert_eq!(normalize_axis(-1, 3).unwrap(), 2);
        assert!(normalize_axis(3, 3).is_err());
        assert!(normalize_axis(-4, 3).is_err());
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(strides(&[]), Vec::<usize>::new());
    }

    #[test]
    fn broadcast_index_map() {
        assert_eq!(broadcast_shape(&[2, 1], &[3]).unwrap(), vec![2, 3]);
        assert!(broadcast_shape(&[2], &[3]).is_err());
        assert_eq!(broadcast_indices(&[2, 1], &[2, 3]), vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(broadcast_indices(&[3], &[2, 3]), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(broadcast_indices(&[], &[2]), vec![0, 0]);
        assert_eq!(broadcast_indices(&[2, 0], &[2, 0]), Vec::<usize>::new());
    }
}
