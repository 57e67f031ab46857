//! Kernels for the `VisionOp` family (see `kiln_ir::op_vision`).
//!
//! Float kernels compute in f64 and round once to the input's dtype (f32, f64,
//! f16, bf16), which keeps them exact against the f32/f64 reference within the
//! conformance tolerance.

mod detect;
mod norm;
mod sample;
mod signal;

use crate::{invalid, optional, required, unsupported, Result};
use half::{bf16, f16};
use kiln_ir::{DType, Tensor, TensorData, VisionOp};

/// Largest number of elements a kernel of this family will allocate.
const MAX_ELEMS: usize = 1 << 31;

/// Runs one op of the family on its present inputs.
pub fn run(op: &VisionOp, inputs: &[Option<&Tensor>], num_outputs: usize) -> Result<Vec<Tensor>> {
    let _ = num_outputs;
    let x = |i: usize, what: &str| required(inputs, i, what);
    let opt = |i: usize| optional(inputs, i);
    let t = match op {
        VisionOp::Lrn {
            alpha,
            beta,
            bias,
            size,
        } => norm::lrn(x(0, "X")?, *alpha, *beta, *bias, *size)?,
        VisionOp::GroupNormalization {
            epsilon,
            num_groups,
            per_group,
        } => norm::group_norm(
            x(0, "X")?,
            x(1, "scale")?,
            x(2, "bias")?,
            *epsilon,
            *num_groups,
            *per_group,
        )?,
        VisionOp::MeanVarianceNormalization { axes } => norm::mvn(x(0, "X")?, axes)?,
        VisionOp::LpNormalization { axis, p } => norm::lp_norm(x(0, "input")?, *axis, *p)?,
        VisionOp::LpPool { pool, p } => norm::lp_pool(x(0, "X")?, pool, *p)?,
        VisionOp::MaxUnpool {
            kernel_shape,
            pads,
            strides,
        } => sample::max_unpool(x(0, "X")?, x(1, "I")?, opt(2), kernel_shape, pads, strides)?,
        VisionOp::GridSample {
            mode,
            padding,
            align_corners,
        } => sample::grid_sample(x(0, "X")?, x(1, "grid")?, *mode, *padding, *align_corners)?,
        VisionOp::AffineGrid { align_corners } => {
            sample::affine_grid(x(0, "theta")?, x(1, "size")?, *align_corners)?
        }
        VisionOp::DeformConv { conv, offset_group } => sample::deform_conv(
            x(0, "X")?,
            x(1, "W")?,
            x(2, "offset")?,
            opt(3),
            opt(4),
            conv,
            *offset_group,
        )?,
        VisionOp::RoiAlign {
            max_mode,
            output_height,
            output_width,
            sampling_ratio,
            spatial_scale,
            half_pixel,
        } => detect::roi_align(
            x(0, "X")?,
            x(1, "rois")?,
            x(2, "batch_indices")?,
            &detect::RoiAlignParams {
                max_mode: *max_mode,
                out_h: *output_height,
                out_w: *output_width,
                sampling_ratio: *sampling_ratio,
                spatial_scale: *spatial_scale as f64,
                half_pixel: *half_pixel,
            },
        )?,
        VisionOp::MaxRoiPool {
            pooled_shape,
            spatial_scale,
        } => detect::max_roi_pool(x(0, "X")?, x(1, "rois")?, *pooled_shape, *spatial_scale)?,
        VisionOp::NonMaxSuppression { center_point_box } => detect::nms(
            x(0, "boxes")?,
            x(1, "scores")?,
            opt(2),
            opt(3),
            opt(4),
            *center_point_box,
        )?,
        VisionOp::Dft { inverse, onesided } => {
            signal::dft(x(0, "input")?, opt(1), opt(2), *inverse, *onesided)?
        }
        VisionOp::Stft { onesided } => signal::stft(
            x(0, "signal")?,
            x(1, "frame_step")?,
            opt(2),
            opt(3),
            *onesided,
        )?,
        VisionOp::HannWindow { periodic, dtype } => {
            signal::window(signal::Window::Hann, x(0, "size")?, *periodic, *dtype)?
        }
        VisionOp::HammingWindow { periodic, dtype } => {
            signal::window(signal::Window::Hamming, x(0, "size")?, *periodic, *dtype)?
        }
        VisionOp::BlackmanWindow { periodic, dtype } => {
            signal::window(signal::Window::Blackman, x(0, "size")?, *periodic, *dtype)?
        }
        VisionOp::MelWeightMatrix { dtype } => signal::mel_weight_matrix(
            x(0, "num_mel_bins")?,
            x(1, "dft_length")?,
            x(2, "sample_rate")?,
            x(3, "lower_edge_hertz")?,
            x(4, "upper_edge_hertz")?,
            *dtype,
        )?,
    };
    Ok(vec![t])
}

/// The elements of a float tensor as f64, or an error for other dtypes.
pub(crate) fn floats(t: &Tensor, what: &str) -> Result<Vec<f64>> {
    if !t.dtype().is_float() {
        return Err(unsupported!(
            "{what}: expected a float tensor, got {} {:?}",
            t.dtype(),
            t.shape()
        ));
    }
    t.to_f64_vec().map_err(|e| invalid!("{what}: {e}"))
}

/// Builds a tensor of `dtype` from f64 values (one rounding).
pub(crate) fn from_f64(shape: Vec<usize>, v: Vec<f64>, dtype: DType) -> Result<Tensor> {
    let data = match dtype {
        DType::F32 => TensorData::F32(v.into_iter().map(|x| x as f32).collect()),
        DType::F64 => TensorData::F64(v),
        DType::F16 => TensorData::F16(v.into_iter().map(f16::from_f64).collect()),
        DType::BF16 => TensorData::BF16(v.into_iter().map(bf16::from_f64).collect()),
        DType::I8 => TensorData::I8(v.into_iter().map(|x| x as i8).collect()),
        DType::I16 => TensorData::I16(v.into_iter().map(|x| x as i16).collect()),
        DType::I32 => TensorData::I32(v.into_iter().map(|x| x as i32).collect()),
        DType::I64 => TensorData::I64(v.into_iter().map(|x| x as i64).collect()),
        DType::U8 => TensorData::U8(v.into_iter().map(|x| x as u8).collect()),
        DType::U16 => TensorData::U16(v.into_iter().map(|x| x as u16).collect()),
        DType::U32 => TensorData::U32(v.into_iter().map(|x| x as u32).collect()),
        DType::U64 => TensorData::U64(v.into_iter().map(|x| x as u64).collect()),
        d => return Err(unsupported!("output dtype {d}")),
    };
    crate::util::tensor(shape, data)
}

/// Product of `shape`, refusing overflow and absurd sizes.
pub(crate) fn checked_len(shape: &[usize], what: &str) -> Result<usize> {
    match kiln_ir::checked_numel(shape) {
        Some(n) if n <= MAX_ELEMS => Ok(n),
        _ => Err(invalid!("{what}: shape {shape:?} is too large")),
    }
}

/// The single value of a one-element tensor as i64.
pub(crate) fn scalar_i64(t: &Tensor, what: &str) -> Result<i64> {
    let v = crate::util::i64_values(t, what)?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => Err(invalid!(
            "{what} must hold one value, got shape {:?}",
            t.shape()
        )),
    }
}

/// The single value of a one-element tensor as f64.
pub(crate) fn scalar_f64(t: &Tensor, what: &str) -> Result<f64> {
    let v = t.to_f64_vec().map_err(|e| invalid!("{what}: {e}"))?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => Err(invalid!(
            "{what} must hold one value, got shape {:?}",
            t.shape()
        )),
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use kiln_ir::Tensor;

    pub fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    pub fn f32s(t: &Tensor) -> Vec<f32> {
        t.as_slice::<f32>().unwrap().to_vec()
    }

    #[track_caller]
    pub fn close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let ok = (g - w).abs() <= tol * (1.0 + w.abs()) || (g.is_nan() && w.is_nan());
            assert!(
                ok,
                "element {i}: got {g}, want {w}\n got {got:?}\nwant {want:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(scalar_i64(&Tensor::scalar(3i32), "n").unwrap(), 3);
        assert!(scalar_i64(&Tensor::vector(vec![1i64, 2]), "n").is_err());
        assert_eq!(scalar_f64(&Tensor::vector(vec![2.5f32]), "f").unwrap(), 2.5);
        assert!(floats(&Tensor::scalar(1i64), "x").is_err());
        let h = from_f64(vec![2], vec![1.0, 0.5], DType::F16).unwrap();
        assert_eq!(h.dtype(), DType::F16);
        assert!(checked_len(&[usize::MAX, 2], "x").is_err());
        assert!(from_f64(vec![3], vec![1.0], DType::F32).is_err());
    }

    #[test]
    fn missing_input_is_an_error() {
        let op = VisionOp::Lrn {
            alpha: 1e-4,
            beta: 0.75,
            bias: 1.0,
            size: 3,
        };
        assert!(run(&op, &[], 1).is_err());
        assert!(run(&op, &[None], 1).is_err());
    }
}
