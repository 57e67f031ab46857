//! Typed vision, signal and normalization ops (GridSample, RoiAlign, NonMaxSuppression, LRN, LpPool, GroupNormalization, DFT, STFT, windows, ...).
//!
//! Each family of ops keeps its enum, its ONNX names and its shape/type rule
//! here; the frontend parses it in `kiln-onnx/src/convert_vision.rs` and the kernels
//! live in `kiln-cpu/src/vision.rs`.
//!
//! Modes reuse the crate's public enums so that other crates can name them:
//! GridSample's interpolation is a [`ResizeMode`] (nearest / linear / cubic) and
//! its padding a [`PadMode`] (`Constant` = zeros, `Edge` = border, `Reflect` =
//! reflection).

use crate::{ConvAttrs, DType, Dim, PadMode, PoolAttrs, ResizeMode, Shape, Tensor, ValueType};

/// vision, signal and normalization ops (GridSample, RoiAlign, NonMaxSuppression, LRN, LpPool, GroupNormalization, DFT, STFT, windows, ...).
#[derive(Clone, Debug, PartialEq)]
pub enum VisionOp {
    /// Local response normalization across channels of an `[N, C, ...]` input.
    Lrn {
        alpha: f32,
        beta: f32,
        bias: f32,
        size: usize,
    },
    /// Inputs: X, scale, bias. `per_group`: the opset-18 form, where scale and
    /// bias hold one value per group instead of one per channel.
    GroupNormalization {
        epsilon: f32,
        num_groups: usize,
        per_group: bool,
    },
    /// Normalizes to zero mean and unit variance over `axes`.
    MeanVarianceNormalization {
        axes: Vec<i64>,
    },
    LpNormalization {
        axis: i64,
        p: i64,
    },
    /// `pool.count_include_pad` is unused.
    LpPool {
        pool: PoolAttrs,
        p: i64,
    },
    /// Inputs: X, I, output_shape?.
    MaxUnpool {
        kernel_shape: Vec<usize>,
        pads: Vec<usize>,
        strides: Vec<usize>,
    },
    /// Inputs: X, grid.
    GridSample {
        mode: ResizeMode,
        /// `Constant`: zeros, `Edge`: border, `Reflect`: reflection.
        padding: PadMode,
        align_corners: bool,
    },
    /// Inputs: theta, size.
    AffineGrid {
        align_corners: bool,
    },
    /// Inputs: X, rois, batch_indices.
    RoiAlign {
        max_mode: bool,
        output_height: usize,
        output_width: usize,
        sampling_ratio: i64,
        spatial_scale: f32,
        /// `coordinate_transformation_mode` half_pixel (false: output_half_pixel).
        half_pixel: bool,
    },
    /// Inputs: X, rois.
    MaxRoiPool {
        pooled_shape: [usize; 2],
        spatial_scale: f32,
    },
    /// Inputs: boxes, scores, max_output_boxes_per_class?, iou_threshold?,
    /// score_threshold?.
    NonMaxSuppression {
        center_point_box: bool,
    },
    /// Inputs: X, W, offset, B?, mask?.
    DeformConv {
        conv: ConvAttrs,
        offset_group: usize,
    },
    /// Inputs: input, dft_length?, axis? (the opset-17 attribute arrives as an
    /// input; absent means -2).
    Dft {
        inverse: bool,
        onesided: bool,
    },
    /// Inputs: signal, frame_step, window?, frame_length?.
    Stft {
        onesided: bool,
    },
    /// Input: size.
    HannWindow {
        periodic: bool,
        dtype: DType,
    },
    HammingWindow {
        periodic: bool,
        dtype: DType,
    },
    BlackmanWindow {
        periodic: bool,
        dtype: DType,
    },
    /// Inputs: num_mel_bins, dft_length, sample_rate, lower_edge_hertz,
    /// upper_edge_hertz.
    MelWeightMatrix {
        dtype: DType,
    },
}

fn unknown_rank(rank: usize) -> Shape {
    vec![Dim::Unknown; rank]
}

fn scalar_int(t: Option<&Tensor>) -> Option<i64> {
    t.and_then(|t| t.to_i64_vec().ok())
        .and_then(|v| if v.len() == 1 { Some(v[0]) } else { None })
}

impl VisionOp {
    /// The ONNX operator name.
    pub fn name(&self) -> &'static str {
        match self {
            VisionOp::Lrn { .. } => "LRN",
            VisionOp::GroupNormalization { .. } => "GroupNormalization",
            VisionOp::MeanVarianceNormalization { .. } => "MeanVarianceNormalization",
            VisionOp::LpNormalization { .. } => "LpNormalization",
            VisionOp::LpPool { .. } => "LpPool",
            VisionOp::MaxUnpool { .. } => "MaxUnpool",
            VisionOp::GridSample { .. } => "GridSample",
            VisionOp::AffineGrid { .. } => "AffineGrid",
            VisionOp::RoiAlign { .. } => "RoiAlign",
            VisionOp::MaxRoiPool { .. } => "MaxRoiPool",
            VisionOp::NonMaxSuppression { .. } => "NonMaxSuppression",
            VisionOp::DeformConv { .. } => "DeformConv",
            VisionOp::Dft { .. } => "DFT",
            VisionOp::Stft { .. } => "STFT",
            VisionOp::HannWindow { .. } => "HannWindow",
            VisionOp::HammingWindow { .. } => "HammingWindow",
            VisionOp::BlackmanWindow { .. } => "BlackmanWindow",
            VisionOp::MelWeightMatrix { .. } => "MelWeightMatrix",
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
        let cst = |i: usize| consts.get(i).copied().flatten();
        let shape = |i: usize| ty(i).and_then(|t| t.shape.clone());
        let t0 = ty(0);
        let one = |v: Option<ValueType>| {
            let mut out = vec![v];
            out.resize(num_outputs.max(1), None);
            out
        };
        let same_rank = |t: Option<&ValueType>| {
            t.map(|t| ValueType::new(t.dtype, t.shape.as_ref().map(|s| unknown_rank(s.len()))))
        };
        let window = |dtype: DType| {
            let n = scalar_int(cst(0)).and_then(|n| usize::try_from(n).ok());
            Some(ValueType::new(
                dtype,
                Some(vec![n.map(Dim::Known).unwrap_or(Dim::Unknown)]),
            ))
        };
        Ok(match self {
            VisionOp::Lrn { .. }
            | VisionOp::GroupNormalization { .. }
            | VisionOp::MeanVarianceNormalization { .. }
            | VisionOp::LpNormalization { .. } => one(t0.cloned()),
            VisionOp::LpPool { .. }
            | VisionOp::MaxUnpool { .. }
            | VisionOp::DeformConv { .. }
            | VisionOp::Dft { .. } => one(same_rank(t0)),
            VisionOp::GridSample { .. } => {
                let s = match (shape(0), shape(1)) {
                    (Some(x), Some(g)) if x.len() >= 2 && g.len() >= 2 => {
                        let mut s = vec![x[0].clone(), x[1].clone()];
                        s.extend(g[1..g.len() - 1].iter().cloned());
                        Some(s)
                    }
                    (Some(x), _) => Some(unknown_rank(x.len())),
                    _ => None,
                };
                one(t0.map(|t| ValueType::new(t.dtype, s)))
            }
            VisionOp::AffineGrid { .. } => {
                let s = cst(1)
                    .and_then(|t| t.to_i64_vec().ok())
                    .map(|v| unknown_rank(v.len()));
                one(t0.map(|t| ValueType::new(t.dtype, s)))
            }
            VisionOp::RoiAlign {
                output_height,
                output_width,
                ..
            } => {
                let n = shape(2)
                    .and_then(|s| s.first().cloned())
                    .unwrap_or(Dim::Unknown);
                let c = shape(0)
                    .and_then(|s| s.get(1).cloned())
                    .unwrap_or(Dim::Unknown);
                one(t0.map(|t| {
                    ValueType::new(
                        t.dtype,
                        Some(vec![
                            n,
                            c,
                            Dim::Known(*output_height),
                            Dim::Known(*output_width),
                        ]),
                    )
                }))
            }
            VisionOp::MaxRoiPool { pooled_shape, .. } => {
                let n = shape(1)
                    .and_then(|s| s.first().cloned())
                    .unwrap_or(Dim::Unknown);
                let c = shape(0)
                    .and_then(|s| s.get(1).cloned())
                    .unwrap_or(Dim::Unknown);
                one(t0.map(|t| {
                    ValueType::new(
                        t.dtype,
                        Some(vec![
                            n,
                            c,
                            Dim::Known(pooled_shape[0]),
                            Dim::Known(pooled_shape[1]),
                        ]),
                    )
                }))
            }
            VisionOp::NonMaxSuppression { .. } => one(Some(ValueType::new(
                DType::I64,
                Some(vec![Dim::Unknown, Dim::Known(3)]),
            ))),
            VisionOp::Stft { .. } => {
                one(t0.map(|t| ValueType::new(t.dtype, Some(unknown_rank(4)))))
            }
            VisionOp::HannWindow { dtype, .. }
            | VisionOp::HammingWindow { dtype, .. }
            | VisionOp::BlackmanWindow { dtype, .. } => one(window(*dtype)),
            VisionOp::MelWeightMatrix { dtype } => {
                one(Some(ValueType::new(*dtype, Some(unknown_rank(2)))))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_inference() {
        let op = VisionOp::Lrn {
            alpha: 1e-4,
            beta: 0.75,
            bias: 1.0,
            size: 3,
        };
        assert_eq!(op.name(), "LRN");
        let x = ValueType::new(DType::F32, Some(vec![Dim::named("N"), Dim::Known(3)]));
        let out = op.infer(&[Some(x.clone())], &[None], 1).unwrap();
        assert_eq!(out, vec![Some(x)]);

        let w = VisionOp::HannWindow {
            periodic: true,
            dtype: DType::F64,
        };
        let size = Tensor::scalar(8i64);
        let out = w.infer(&[None], &[Some(&size)], 1).unwrap();
        assert_eq!(
            out,
            vec![Some(ValueType::new(DType::F64, Some(vec![Dim::Known(8)])))]
        );

        let nms = VisionOp::NonMaxSuppression {
            center_point_box: false,
        };
        let out = nms.infer(&[None, None], &[None, None], 1).unwrap();
        assert_eq!(out[0].as_ref().map(|t| t.dtype), Some(DType::I64));

        let gs = VisionOp::GridSample {
            mode: ResizeMode::Linear,
            padding: PadMode::Constant,
            align_corners: false,
        };
        let x = ValueType::new(
            DType::F32,
            Some(vec![
                Dim::Known(1),
                Dim::Known(2),
                Dim::Known(4),
                Dim::Known(4),
            ]),
        );
        let g = ValueType::new(
            DType::F32,
            Some(vec![
                Dim::Known(1),
                Dim::Known(5),
                Dim::Known(6),
                Dim::Known(2),
            ]),
        );
        let out = gs.infer(&[Some(x), Some(g)], &[None, None], 1).unwrap();
        assert_eq!(
            out[0].as_ref().and_then(|t| t.shape.clone()),
            Some(vec![
                Dim::Known(1),
                Dim::Known(2),
                Dim::Known(5),
                Dim::Known(6)
            ])
        );
    }
}
