//! Typed attention, recurrent and loss ops (Attention, RotaryEmbedding, RMSNormalization, RNN, GRU, NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss, ...).
//!
//! Each family of ops keeps its enum, its ONNX names and its shape/type rule
//! here; the frontend parses it in `kiln-onnx/src/convert_attn.rs` and the kernels
//! live in `kiln-cpu/src/attn.rs`.

use crate::{DType, Dim, ReduceOp, RnnDirection, Shape, Tensor, ValueType};

/// An activation of the recurrent ops (RNN, GRU) with its alpha/beta
/// parameters. Built with [`AttnOp::rnn_activation`], evaluated with
/// [`RnnAct::eval`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RnnAct {
    Sigmoid,
    Tanh,
    Relu,
    Affine { alpha: f32, beta: f32 },
    LeakyRelu { alpha: f32 },
    ThresholdedRelu { alpha: f32 },
    ScaledTanh { alpha: f32, beta: f32 },
    HardSigmoid { alpha: f32, beta: f32 },
    Elu { alpha: f32 },
    Softsign,
    Softplus,
}

impl RnnAct {
    /// The activation's value at `x`.
    pub fn eval(self, x: f64) -> f64 {
        match self {
            RnnAct::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            RnnAct::Tanh => x.tanh(),
            RnnAct::Relu => x.max(0.0),
            RnnAct::Affine { alpha, beta } => alpha as f64 * x + beta as f64,
            RnnAct::LeakyRelu { alpha } => {
                if x >= 0.0 {
                    x
                } else {
                    alpha as f64 * x
                }
            }
            RnnAct::ThresholdedRelu { alpha } => {
                if x > alpha as f64 {
                    x
                } else {
                    0.0
                }
            }
            RnnAct::ScaledTanh { alpha, beta } => alpha as f64 * (beta as f64 * x).tanh(),
            RnnAct::HardSigmoid { alpha, beta } => (alpha as f64 * x + beta as f64).clamp(0.0, 1.0),
            RnnAct::Elu { alpha } => {
                if x >= 0.0 {
                    x
                } else {
                    alpha as f64 * (x.exp() - 1.0)
                }
            }
            RnnAct::Softsign => x / (1.0 + x.abs()),
            RnnAct::Softplus => {
                if x > 30.0 {
                    x
                } else {
                    x.exp().ln_1p()
                }
            }
        }
    }
}

/// attention, recurrent and loss ops (Attention, RotaryEmbedding, RMSNormalization, RNN, GRU, NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss, ...).
#[derive(Clone, Debug, PartialEq)]
pub enum AttnOp {
    /// Attention (opsets 23-25). Inputs: Q, K, V, attn_mask?, past_key?,
    /// past_value?, nonpad_kv_seqlen?. Outputs: Y, present_key?, present_value?,
    /// qk_matmul_output?.
    Attention {
        is_causal: bool,
        /// Needed for 3-D inputs (`[batch, seq, heads * head_size]`).
        q_num_heads: Option<usize>,
        kv_num_heads: Option<usize>,
        /// `None`: 1 / sqrt(head_size).
        scale: Option<f32>,
        /// Applied as `softcap * tanh(qk / softcap)` when positive.
        softcap: f32,
        /// 0 / 1: QK (after softcap), 2: plus the bias, 3: after softmax.
        qk_matmul_output_mode: i64,
        /// The precision the softmax is computed in (`None`: the input's).
        softmax_precision: Option<DType>,
        /// Sliding-window bounds; -1 leaves a side unbounded.
        left_window_size: i64,
        right_window_size: i64,
    },
    /// Inputs: X, scale. Statistics are computed in f32 or wider.
    RmsNormalization { axis: i64, epsilon: f32 },
    /// Inputs: X, cos_cache, sin_cache, position_ids?.
    RotaryEmbedding {
        interleaved: bool,
        /// 0: the whole head.
        rotary_embedding_dim: usize,
        /// Needed for 3-D input.
        num_heads: Option<usize>,
    },
    /// Inputs: input `[N, C, d...]`, target `[N, d...]`, weight? `[C]`.
    /// `reduction`: `None` (per element), `Sum` or `Mean` (weighted mean).
    NegativeLogLikelihoodLoss {
        reduction: Option<ReduceOp>,
        ignore_index: Option<i64>,
    },
    /// Inputs: scores `[N, C, d...]`, labels `[N, d...]`, weights? `[C]`.
    /// Outputs: loss, log_prob?.
    SoftmaxCrossEntropyLoss {
        reduction: Option<ReduceOp>,
        ignore_index: Option<i64>,
    },
    /// RNN and GRU. Inputs: X, W, R, B?, sequence_lens?, initial_h?. Outputs: Y, Y_h.
    Recurrent {
        /// false: RNN (gates: none), true: GRU (gates z, r, h).
        gru: bool,
        direction: RnnDirection,
        /// `None`: taken from R's last dim.
        hidden_size: Option<usize>,
        /// Per direction (RNN: f; GRU: f, g), or one set for all; empty: defaults.
        activations: Vec<RnnAct>,
        clip: Option<f32>,
        /// 1: batch-major `[B, S, ...]` tensors.
        layout: i64,
        /// GRU only.
        linear_before_reset: bool,
    },
    /// Inputs: A, B (same shape). `A * sigmoid(alpha * A) * B`.
    SwiGlu { alpha: f32 },
    /// Depthwise causal 1-D convolution carrying its state. Inputs: input
    /// `[B, C, L]`, weight `[C, 1, k]`, bias? `[C]`, past_state? `[B, C, k-1]`.
    /// Outputs: output `[B, C, L]`, present_state `[B, C, k-1]`.
    CausalConvWithState {
        /// Apply SiLU (`x * sigmoid(x)`, "silu" or "swish") to the output.
        silu: bool,
    },
    /// Recurrent linear attention over 3-D `[B, T, H*D]` query, key and value.
    /// Inputs: query, key, value, past_state? `[B, H_kv, d_k, d_v]`, decay?, beta?.
    /// Outputs: output `[B, T, H_q*d_v]`, present_state.
    LinearAttention {
        q_num_heads: usize,
        kv_num_heads: usize,
        /// `None`: 1 / sqrt(d_k).
        scale: Option<f32>,
        /// update_rule "gated" / "gated_delta": the state decays by exp(decay).
        gated: bool,
        /// update_rule "delta" / "gated_delta": delta-rule correction with beta.
        delta: bool,
    },
}

fn same_as(types: &[Option<ValueType>], i: usize) -> Option<ValueType> {
    types.get(i).cloned().flatten()
}

fn shape_of(types: &[Option<ValueType>], i: usize) -> Option<Shape> {
    types
        .get(i)
        .and_then(|t| t.as_ref())
        .and_then(|t| t.shape.clone())
}

fn dtype_of(types: &[Option<ValueType>], i: usize) -> Option<DType> {
    types.get(i).and_then(|t| t.as_ref()).map(|t| t.dtype)
}

fn float_input(types: &[Option<ValueType>], i: usize, what: &str) -> Result<(), String> {
    match dtype_of(types, i) {
        Some(d) if !d.is_float() => Err(format!("{what} must be a float tensor, got {d}")),
        _ => Ok(()),
    }
}

impl AttnOp {
    /// The ONNX operator name.
    /// The recurrent activation named `name` (case-insensitive, as in the RNN,
    /// GRU and LSTM `activations` attribute) with its alpha/beta (ONNX defaults
    /// when absent); `None` for an unknown name.
    pub fn rnn_activation(name: &str, alpha: Option<f32>, beta: Option<f32>) -> Option<RnnAct> {
        let a = |d: f32| alpha.unwrap_or(d);
        let b = |d: f32| beta.unwrap_or(d);
        Some(match name.to_ascii_lowercase().as_str() {
            "sigmoid" => RnnAct::Sigmoid,
            "tanh" => RnnAct::Tanh,
            "relu" => RnnAct::Relu,
            "affine" => RnnAct::Affine {
                alpha: a(1.0),
                beta: b(0.0),
            },
            "leakyrelu" => RnnAct::LeakyRelu { alpha: a(0.01) },
            "thresholdedrelu" => RnnAct::ThresholdedRelu { alpha: a(1.0) },
            "scaledtanh" => RnnAct::ScaledTanh {
                alpha: a(1.0),
                beta: b(1.0),
            },
            "hardsigmoid" => RnnAct::HardSigmoid {
                alpha: a(0.2),
                beta: b(0.5),
            },
            "elu" => RnnAct::Elu { alpha: a(1.0) },
            "softsign" => RnnAct::Softsign,
            "softplus" => RnnAct::Softplus,
            _ => return None,
        })
    }

    /// The ONNX operator name.
    pub fn name(&self) -> &'static str {
        match self {
            AttnOp::Attention { .. } => "Attention",
            AttnOp::RmsNormalization { .. } => "RMSNormalization",
            AttnOp::RotaryEmbedding { .. } => "RotaryEmbedding",
            AttnOp::NegativeLogLikelihoodLoss { .. } => "NegativeLogLikelihoodLoss",
            AttnOp::SoftmaxCrossEntropyLoss { .. } => "SoftmaxCrossEntropyLoss",
            AttnOp::Recurrent { gru: false, .. } => "RNN",
            AttnOp::Recurrent { gru: true, .. } => "GRU",
            AttnOp::SwiGlu { .. } => "SwiGLU",
            AttnOp::CausalConvWithState { .. } => "CausalConvWithState",
            AttnOp::LinearAttention { .. } => "LinearAttention",
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
        let mut out: Vec<Option<ValueType>> = match self {
            AttnOp::Attention {
                q_num_heads,
                kv_num_heads,
                ..
            } => {
                float_input(types, 0, "Q")?;
                let dt = dtype_of(types, 0);
                let (q, k, v) = (shape_of(types, 0), shape_of(types, 1), shape_of(types, 2));
                let past = shape_of(types, 4);
                let mk = |s: Option<Shape>| dt.map(|d| ValueType::new(d, s));
                let mut y = None;
                let mut pk = None;
                let mut pv = None;
                let mut qk = None;
                if let (Some(q), Some(k), Some(v)) = (&q, &k, &v) {
                    if q.len() != k.len() || q.len() != v.len() {
                        return Err(format!(
                            "Q, K and V must have the same rank, got {}, {} and {}",
                            q.len(),
                            k.len(),
                            v.len()
                        ));
                    }
                    let kv_total = |s: &Dim| match &past {
                        Some(p) if p.len() == 4 => p[2].add(s),
                        Some(_) => Dim::Unknown,
                        None => s.clone(),
                    };
                    match q.len() {
                        4 => {
                            let skv = kv_total(&k[2]);
                            y = Some(vec![q[0].clone(), q[1].clone(), q[2].clone(), v[3].clone()]);
                            pk = Some(vec![k[0].clone(), k[1].clone(), skv.clone(), k[3].clone()]);
                            pv = Some(vec![v[0].clone(), v[1].clone(), skv.clone(), v[3].clone()]);
                            qk = Some(vec![q[0].clone(), q[1].clone(), q[2].clone(), skv]);
                        }
                        3 => {
                            let (Some(hq), Some(hkv)) = (*q_num_heads, *kv_num_heads) else {
                                return Err(
                                    "3-D inputs need the q_num_heads and kv_num_heads attributes"
                                        .into(),
                                );
                            };
                            let (hq, hkv) = (Dim::Known(hq), Dim::Known(hkv));
                            let skv = kv_total(&k[1]);
                            let dv = v[2].div(&hkv);
                            y = Some(vec![q[0].clone(), q[1].clone(), dv.mul(&hq)]);
                            pk = Some(vec![k[0].clone(), hkv.clone(), skv.clone(), k[2].div(&hkv)]);
                            pv = Some(vec![v[0].clone(), hkv, skv.clone(), dv]);
                            qk = Some(vec![q[0].clone(), hq, q[1].clone(), skv]);
                        }
                        r => return Err(format!("Q, K and V must be 3-D or 4-D, got rank {r}")),
                    }
                }
                vec![mk(y), mk(pk), mk(pv), mk(qk)]
            }
            AttnOp::RmsNormalization { .. }
            | AttnOp::RotaryEmbedding { .. }
            | AttnOp::SwiGlu { .. } => {
                float_input(types, 0, "the input")?;
                vec![same_as(types, 0)]
            }
            AttnOp::CausalConvWithState { .. } => {
                float_input(types, 0, "the input")?;
                let state = match (shape_of(types, 0), shape_of(types, 1)) {
                    (Some(x), Some(w)) if x.len() == 3 && w.len() == 3 => match &w[2] {
                        Dim::Known(k) if *k >= 1 => {
                            Some(vec![x[0].clone(), x[1].clone(), Dim::Known(k - 1)])
                        }
                        _ => None,
                    },
                    _ => None,
                };
                vec![
                    same_as(types, 0),
                    dtype_of(types, 0).map(|d| ValueType::new(d, state)),
                ]
            }
            AttnOp::LinearAttention {
                q_num_heads,
                kv_num_heads,
                ..
            } => {
                float_input(types, 0, "query")?;
                let (hq, hkv) = (Dim::Known(*q_num_heads), Dim::Known(*kv_num_heads));
                let (q, v) = (shape_of(types, 0), shape_of(types, 2));
                let (y, st) = match (q, v) {
                    (Some(q), Some(v)) if q.len() == 3 && v.len() == 3 => {
                        let dv = v[2].div(&hkv);
                        (
                            Some(vec![q[0].clone(), q[1].clone(), dv.mul(&hq)]),
                            Some(vec![q[0].clone(), hkv, q[2].div(&hq), dv]),
                        )
                    }
                    _ => (None, None),
                };
                let st_dt = dtype_of(types, 3).or(dtype_of(types, 0));
                vec![
                    dtype_of(types, 0).map(|d| ValueType::new(d, y)),
                    st_dt.map(|d| ValueType::new(d, st)),
                ]
            }
            AttnOp::NegativeLogLikelihoodLoss { reduction, .. }
            | AttnOp::SoftmaxCrossEntropyLoss { reduction, .. } => {
                float_input(types, 0, "the input")?;
                if let Some(d) = dtype_of(types, 1) {
                    if !d.is_int() {
                        return Err(format!("the target must be an integer tensor, got {d}"));
                    }
                }
                let loss = dtype_of(types, 0).map(|d| {
                    let shape = match reduction {
                        None => shape_of(types, 1),
                        Some(_) => Some(vec![]),
                    };
                    ValueType::new(d, shape)
                });
                vec![loss, same_as(types, 0)]
            }
            AttnOp::Recurrent {
                direction,
                hidden_size,
                layout,
                ..
            } => {
                float_input(types, 0, "X")?;
                let dt = dtype_of(types, 0);
                let dirs = Dim::Known(if *direction == RnnDirection::Bidirectional {
                    2
                } else {
                    1
                });
                let hs = match hidden_size {
                    Some(h) => Some(Dim::Known(*h)),
                    None => shape_of(types, 2).and_then(|r| r.get(2).cloned()),
                };
                let (y, yh) = match (shape_of(types, 0), hs) {
                    (Some(x), Some(h)) if x.len() == 3 => {
                        if *layout == 0 {
                            (
                                Some(vec![x[0].clone(), dirs.clone(), x[1].clone(), h.clone()]),
                                Some(vec![dirs, x[1].clone(), h]),
                            )
                        } else {
                            (
                                Some(vec![x[0].clone(), x[1].clone(), dirs.clone(), h.clone()]),
                                Some(vec![x[0].clone(), dirs, h]),
                            )
                        }
                    }
                    _ => (None, None),
                };
                vec![
                    dt.map(|d| ValueType::new(d, y)),
                    dt.map(|d| ValueType::new(d, yh)),
                ]
            }
        };
        out.resize(num_outputs, None);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vt(d: DType, s: &[usize]) -> Option<ValueType> {
        Some(ValueType::new(d, Some(crate::known_shape(s))))
    }

    #[test]
    fn attention_shapes() {
        let op = AttnOp::Attention {
            is_causal: false,
            q_num_heads: Some(4),
            kv_num_heads: Some(2),
            scale: None,
            softcap: 0.0,
            qk_matmul_output_mode: 0,
            softmax_precision: None,
            left_window_size: -1,
            right_window_size: -1,
        };
        let types = vec![
            vt(DType::F32, &[2, 3, 32]),
            vt(DType::F32, &[2, 5, 16]),
            vt(DType::F32, &[2, 5, 12]),
        ];
        let out = op.infer(&types, &[], 4).unwrap();
        assert_eq!(out[0], vt(DType::F32, &[2, 3, 24]));
        assert_eq!(out[1], vt(DType::F32, &[2, 2, 5, 8]));
        assert_eq!(out[2], vt(DType::F32, &[2, 2, 5, 6]));
        assert_eq!(out[3], vt(DType::F32, &[2, 4, 3, 5]));
        let bad = vec![vt(DType::F32, &[2, 3, 32]), vt(DType::F32, &[2, 5, 4, 4])];
        let types = [bad, vec![vt(DType::F32, &[2, 5, 4, 4])]].concat();
        assert!(op.infer(&types, &[], 1).is_err());
    }

    #[test]
    fn loss_and_rnn_shapes() {
        let op = AttnOp::NegativeLogLikelihoodLoss {
            reduction: None,
            ignore_index: None,
        };
        let types = vec![vt(DType::F32, &[3, 5, 2]), vt(DType::I64, &[3, 2])];
        assert_eq!(
            op.infer(&types, &[], 1).unwrap()[0],
            vt(DType::F32, &[3, 2])
        );
        let op = AttnOp::SoftmaxCrossEntropyLoss {
            reduction: Some(ReduceOp::Mean),
            ignore_index: None,
        };
        let out = op.infer(&types, &[], 2).unwrap();
        assert_eq!(out[0], vt(DType::F32, &[]));
        assert_eq!(out[1], vt(DType::F32, &[3, 5, 2]));
        let bad = vec![vt(DType::F32, &[3, 5]), vt(DType::F32, &[3])];
        assert!(op.infer(&bad, &[], 1).is_err());
        let op = AttnOp::Recurrent {
            gru: true,
            direction: RnnDirection::Bidirectional,
            hidden_size: Some(4),
            activations: vec![],
            clip: None,
            layout: 0,
            linear_before_reset: false,
        };
        let out = op.infer(&[vt(DType::F32, &[7, 2, 3])], &[], 2).unwrap();
        assert_eq!(out[0], vt(DType::F32, &[7, 2, 2, 4]));
        assert_eq!(out[1], vt(DType::F32, &[2, 2, 4]));
    }

    #[test]
    fn rnn_activations() {
        let f = AttnOp::rnn_activation("Affine", Some(2.0), Some(1.0)).unwrap();
        assert_eq!(f.eval(3.0), 7.0);
        let f = AttnOp::rnn_activation("scaledtanh", Some(2.0), Some(0.5)).unwrap();
        assert!((f.eval(1.0) - 2.0 * 0.5f64.tanh()).abs() < 1e-12);
        let f = AttnOp::rnn_activation("LeakyRelu", None, None).unwrap();
        assert!((f.eval(-1.0) + 0.01).abs() < 1e-9);
        let f = AttnOp::rnn_activation("HardSigmoid", None, None).unwrap();
        assert_eq!(f.eval(10.0), 1.0);
        assert_eq!(f.eval(0.0), 0.5);
        assert!(AttnOp::rnn_activation("bogus", None, None).is_none());
    }
}
