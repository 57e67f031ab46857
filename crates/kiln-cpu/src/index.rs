//! Kernels for the `IndexOp` family (see `kiln_ir::op_index`).
//!
//! Data-movement kernels (GatherND, the scatters, Compress, ReverseSequence,
//! TensorScatter, ...) are generic over `T: Clone` and work for every dtype;
//! arithmetic ones (CumSum, Einsum, Det, ...) over the numeric [`Num`] trait.
//! Index sets are computed once without the element type ("plans": lists of
//! flat offsets), then applied to the typed buffer.

mod layout;
mod math;
mod scatter;
mod sort;

use crate::util::i64_values;
use crate::{invalid, Result};
use half::{bf16, f16};
use kiln_ir::{Element, IndexOp, Tensor};

use crate::shape_ops::output_len;

/// Runs one op of the family on its present inputs.
pub fn run(op: &IndexOp, inputs: &[Option<&Tensor>], num_outputs: usize) -> Result<Vec<Tensor>> {
    let name = op.name();
    let x = |i: usize, what: &str| -> Result<&Tensor> {
        inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| invalid!("{name}: missing required input {i} ({what})"))
    };
    let opt = |i: usize| inputs.get(i).copied().flatten();
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        IndexOp::GatherND { batch_dims } => one(scatter::gather_nd(
            x(0, "data")?,
            x(1, "indices")?,
            *batch_dims,
        )?),
        IndexOp::ScatterND { reduction } => one(scatter::scatter_nd(
            x(0, "data")?,
            x(1, "indices")?,
            x(2, "updates")?,
            *reduction,
        )?),
        IndexOp::ScatterElements {
            axis, reduction, ..
        } => one(scatter::scatter_elements(
            name,
            x(0, "data")?,
            x(1, "indices")?,
            x(2, "updates")?,
            *axis,
            *reduction,
        )?),
        IndexOp::TensorScatter { axis, circular } => one(scatter::tensor_scatter(
            x(0, "past_cache")?,
            x(1, "update")?,
            opt(2),
            *axis,
            *circular,
        )?),
        IndexOp::TopK { axis, largest } => sort::top_k(x(0, "X")?, x(1, "K")?, *axis, *largest),
        IndexOp::Unique { axis, sorted } => sort::unique(x(0, "X")?, *axis, *sorted, num_outputs),
        IndexOp::NonZero => one(sort::non_zero(x(0, "X")?)?),
        IndexOp::CumSum { exclusive, reverse } => one(math::cumulate(
            "CumSum",
            x(0, "x")?,
            x(1, "axis")?,
            *exclusive,
            *reverse,
            false,
        )?),
        IndexOp::CumProd { exclusive, reverse } => one(math::cumulate(
            "CumProd",
            x(0, "x")?,
            x(1, "axis")?,
            *exclusive,
            *reverse,
            true,
        )?),
        IndexOp::OneHot { axis } => one(math::one_hot(
            x(0, "indices")?,
            x(1, "depth")?,
            x(2, "values")?,
            *axis,
        )?),
        IndexOp::Einsum { equation } => {
            let ops: Vec<&Tensor> = inputs.iter().copied().flatten().collect();
            one(math::einsum(equation, &ops)?)
        }
        IndexOp::Det => one(math::det(x(0, "X")?)?),
        IndexOp::Shrink { lambd, bias } => one(math::shrink(x(0, "input")?, *lambd, *bias)?),
        IndexOp::Swish { alpha } => one(math::swish(x(0, "X")?, *alpha)?),
        IndexOp::Hardmax { axis, coerce_2d } => {
            one(math::hardmax(x(0, "input")?, *axis, *coerce_2d)?)
        }
        IndexOp::EyeLike { dtype, k } => one(math::eye_like(x(0, "input")?, *dtype, *k)?),
        IndexOp::Compress { axis } => {
            one(layout::compress(x(0, "input")?, x(1, "condition")?, *axis)?)
        }
        IndexOp::ReverseSequence {
            batch_axis,
            time_axis,
        } => one(layout::reverse_sequence(
            x(0, "input")?,
            x(1, "sequence_lens")?,
            *batch_axis,
            *time_axis,
        )?),
        IndexOp::SpaceToDepth { blocksize, crd } => {
            one(layout::space_to_depth(x(0, "input")?, *blocksize, *crd)?)
        }
        IndexOp::DepthToSpace { blocksize, crd } => {
            one(layout::depth_to_space(x(0, "input")?, *blocksize, *crd)?)
        }
        IndexOp::CenterCropPad { axes } => one(layout::center_crop_pad(
            x(0, "input_data")?,
            x(1, "shape")?,
            axes,
        )?),
        IndexOp::Col2Im {
            dilations,
            pads,
            strides,
        } => one(layout::col2im(
            x(0, "input")?,
            x(1, "image_shape")?,
            x(2, "block_shape")?,
            dilations,
            pads,
            strides,
        )?),
    }
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// Values of an integer index tensor. u64 values beyond i64 are refused.
fn index_values(op: &str, t: &Tensor, what: &str) -> Result<Vec<i64>> {
    if !t.dtype().is_int() {
        return Err(invalid!(
            "{op}: {what} must be an integer tensor, got {}",
            t.dtype()
        ));
    }
    if let Some(v) = t.as_slice::<u64>() {
        return v
            .iter()
            .map(|&x| i64::try_from(x).map_err(|_| invalid!("{op}: {what} value {x} is too large")))
            .collect();
    }
    i64_values(t, &format!("{op}: {what}"))
}

/// Resolves index `i` (negative counts from the end) against a dimension of size `dim`.
fn resolve_index(op: &str, i: i64, dim: usize) -> Result<usize> {
    let d = dim as i64;
    let r = if i < 0 { i + d } else { i };
    if r < 0 || r >= d {
        return Err(invalid!(
            "{op}: index {i} is out of range for a dimension of size {dim}"
        ));
    }
    Ok(r as usize)
}

/// The single value of a one-element integer tensor (an axis or k input).
fn scalar_index(op: &str, t: &Tensor, what: &str) -> Result<i64> {
    if t.len() != 1 {
        return Err(invalid!(
            "{op}: {what} must hold exactly one element, got shape {:?}",
            t.shape()
        ));
    }
    index_values(op, t, what)?
        .first()
        .copied()
        .ok_or_else(|| invalid!("{op}: {what} is empty"))
}

fn new_tensor<T: Element>(shape: Vec<usize>, v: Vec<T>) -> Result<Tensor> {
    Tensor::from_vec(shape, v).map_err(|e| invalid!("{e}"))
}

/// Total order for sorting: the type's own order, with NaN above everything
/// (and equal to itself).
fn total_cmp<T: PartialOrd>(a: &T, b: &T) -> std::cmp::Ordering {
    match a.partial_cmp(b) {
        Some(o) => o,
        #[allow(clippy::eq_op)]
        None => (a != a).cmp(&(b != b)),
    }
}

/// A numeric element type. Integer arithmetic wraps; f16/bf16 compute in f32.
pub(crate) trait Num: Element + Copy + PartialOrd + Default {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn one() -> Self;
    fn to_f64(self) -> f64;
    /// Rounds (floats) or truncates and saturates (integers, like `as`).
    fn from_f64(v: f64) -> Self;
}

macro_rules! num_float {
    ($($t:ty),*) => {$(
        impl Num for $t {
            fn add(self, o: Self) -> Self { self + o }
            fn mul(self, o: Self) -> Self { self * o }
            fn one() -> Self { 1.0 }
            #[allow(clippy::unnecessary_cast)]
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(v: f64) -> Self { v as $t }
        }
    )*};
}
num_float!(f32, f64);

macro_rules! num_half {
    ($($t:ident),*) => {$(
        impl Num for $t {
            fn add(self, o: Self) -> Self { $t::from_f32(self.to_f32() + o.to_f32()) }
            fn mul(self, o: Self) -> Self { $t::from_f32(self.to_f32() * o.to_f32()) }
            fn one() -> Self { $t::ONE }
            fn to_f64(self) -> f64 { self.to_f64() }
            fn from_f64(v: f64) -> Self { $t::from_f64(v) }
        }
    )*};
}
num_half!(f16, bf16);

macro_rules! num_int {
    ($($t:ty),*) => {$(
        impl Num for $t {
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            fn one() -> Self { 1 }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(v: f64) -> Self { v as $t }
        }
    )*};
}
num_int!(i8, i16, i32, i64, u8, u16, u32, u64);

/// Runs `$body` with `$v` bound to the `Vec` of a numeric [`kiln_ir::TensorData`];
/// `$other` for bool and string.
macro_rules! with_num {
    ($data:expr, $v:ident => $body:expr, $other:expr) => {
        match $data {
            kiln_ir::TensorData::F32($v) => $body,
            kiln_ir::TensorData::F64($v) => $body,
            kiln_ir::TensorData::F16($v) => $body,
            kiln_ir::TensorData::BF16($v) => $body,
            kiln_ir::TensorData::I8($v) => $body,
            kiln_ir::TensorData::I16($v) => $body,
            kiln_ir::TensorData::I32($v) => $body,
            kiln_ir::TensorData::I64($v) => $body,
            kiln_ir::TensorData::U8($v) => $body,
            kiln_ir::TensorData::U16($v) => $body,
            kiln_ir::TensorData::U32($v) => $body,
            kiln_ir::TensorData::U64($v) => $body,
            _ => $other,
        }
    };
}
pub(crate) use with_num;

/// Like [`with_num!`] for the float dtypes only.
macro_rules! with_float {
    ($data:expr, $v:ident => $body:expr, $other:expr) => {
        match $data {
            kiln_ir::TensorData::F32($v) => $body,
            kiln_ir::TensorData::F64($v) => $body,
            kiln_ir::TensorData::F16($v) => $body,
            kiln_ir::TensorData::BF16($v) => $body,
            _ => $other,
        }
    };
}
pub(crate) use with_float;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(resolve_index("t", -1, 3).unwrap(), 2);
        assert!(resolve_index("t", 3, 3).is_err());
        assert!(resolve_index("t", -4, 3).is_err());
        assert!(resolve_index("t", 0, 0).is_err());
        assert_eq!(total_cmp(&f32::NAN, &1.0), std::cmp::Ordering::Greater);
        assert_eq!(total_cmp(&f32::NAN, &f32::NAN), std::cmp::Ordering::Equal);
        assert_eq!(total_cmp(&-0.0f32, &0.0), std::cmp::Ordering::Equal);
        let t = Tensor::vector(vec![u64::MAX]);
        assert!(index_values("t", &t, "i").is_err());
        assert!(index_values("t", &Tensor::vector(vec![1.0f32]), "i").is_err());
        assert!(scalar_index("t", &Tensor::vector(vec![1i64, 2]), "k").is_err());
        assert!(output_len("t", &[usize::MAX, 2]).is_err());
    }

    #[test]
    fn missing_input_is_an_error() {
        let op = IndexOp::NonZero;
        assert!(run(&op, &[None], 1).is_err());
        assert!(run(&op, &[], 1).is_err());
    }
}
