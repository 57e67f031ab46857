//! kiln's own fused operators: what the graph optimizer (`kiln-opt`) makes out of
//! a Conv/MatMul followed by a bias add, a residual add and an activation, so the
//! kernel applies all of them while each output tile is still in cache.
//!
//! These ops never come from a model file; they exist only after optimization.
//! Their kernels live in `kiln-cpu/src/fused.rs`.

use crate::ConvAttrs;

/// An activation applied in a kernel's epilogue. [`FusedAct::eval`] is the
/// reference definition every fast version is tested against.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FusedAct {
    /// No activation.
    Identity,
    Relu,
    /// `min(max(x, min), max)` (Clip, Relu6).
    Clip {
        min: f32,
        max: f32,
    },
    Sigmoid,
    Tanh,
    /// `max(0, min(1, alpha * x + beta))`.
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// `x * max(0, min(1, x / 6 + 1 / 2))`.
    HardSwish,
    LeakyRelu {
        alpha: f32,
    },
    /// `0.5 * x * (1 + erf(x / sqrt(2)))`.
    GeluErf,
    /// `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`.
    GeluTanh,
    /// `x * sigmoid(x)` (SiLU, Swish).
    Silu,
}

impl FusedAct {
    /// The activation's value at `x`, computed plainly in f64.
    pub fn eval(self, x: f32) -> f32 {
        let v = x as f64;
        let r = match self {
            FusedAct::Identity => v,
            FusedAct::Relu => v.max(0.0),
            FusedAct::Clip { min, max } => v.max(min as f64).min(max as f64),
            FusedAct::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            FusedAct::Tanh => v.tanh(),
            FusedAct::HardSigmoid { alpha, beta } => {
                (alpha as f64 * v + beta as f64).clamp(0.0, 1.0)
            }
            FusedAct::HardSwish => v * (v / 6.0 + 0.5).clamp(0.0, 1.0),
            FusedAct::LeakyRelu { alpha } => {
                if v >= 0.0 {
                    v
                } else {
                    alpha as f64 * v
                }
            }
            FusedAct::GeluErf => 0.5 * v * (1.0 + erf_f64(v / std::f64::consts::SQRT_2)),
            FusedAct::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
            }
            FusedAct::Silu => v / (1.0 + (-v).exp()),
        };
        r as f32
    }

    /// A short name for graph dumps and profiles (`Relu`, `GeluErf`, ...).
    pub fn name(self) -> &'static str {
        match self {
            FusedAct::Identity => "Identity",
            FusedAct::Relu => "Relu",
            FusedAct::Clip { .. } => "Clip",
            FusedAct::Sigmoid => "Sigmoid",
            FusedAct::Tanh => "Tanh",
            FusedAct::HardSigmoid { .. } => "HardSigmoid",
            FusedAct::HardSwish => "HardSwish",
            FusedAct::LeakyRelu { .. } => "LeakyRelu",
            FusedAct::GeluErf => "GeluErf",
            FusedAct::GeluTanh => "GeluTanh",
            FusedAct::Silu => "Silu",
        }
    }
}

/// erf in f64 (Abramowitz-Stegun 7.1.26 is too coarse for a reference; this is
/// the W. J. Cody rational form via libm-quality series/continued fraction).
fn erf_f64(x: f64) -> f64 {
    // erf(x) = 1 - erfc(x); erfc by a continued fraction for |x| > 3, the
    // Maclaurin series below that. Both converge to f64 precision here.
    let a = x.abs();
    let r = if a < 3.0 {
        // Maclaurin: erf(x) = 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1))
        let mut term = a;
        let mut sum = a;
        let x2 = a * a;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add == 0.0 || add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = exp(-a^2)/sqrt(pi) * 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// A fused operator. Output = `act(op(inputs) + bias + residual)`.
#[derive(Clone, Debug, PartialEq)]
pub enum FusedOp {
    /// Conv, then the per-channel bias, then the residual, then `act`.
    /// Inputs: X, W, B?, residual? (residual has exactly the output's shape).
    Conv { conv: ConvAttrs, act: FusedAct },
    /// [`FusedOp::Conv`] on channels-last tensors: X `[N, H, W, C]`, the
    /// residual and the output `[N, OH, OW, M]`; W and B as for Conv. Made
    /// by the optimizer (`passes/channels_last.rs`) for 2-D pointwise and
    /// depthwise convs inside a region it converts, with Transposes at the
    /// region's edges.
    ConvNhwc { conv: ConvAttrs, act: FusedAct },
    /// A pointwise conv (1x1, stride 1, no padding, one group) from C to M
    /// channels, its bias and `pw_act`, then a depthwise conv `dw` over
    /// those M channels (group M, one input channel per group), its bias
    /// and `act`. Inputs: X `[N, C, spatial...]`, W1 `[M, C, 1...]`, B1?
    /// `[M]`, Wd `[M, 1, k...]`, Bd? `[M]`. Made by the optimizer
    /// (`passes/pw_dw.rs`) from a MobileNet block's expansion and the
    /// depthwise conv that alone reads it, so the backend can run the two
    /// without writing the expansion out.
    PointwiseDepthwise {
        pw_act: FusedAct,
        dw: ConvAttrs,
        act: FusedAct,
    },
    /// MatMul (numpy semantics), then the bias along the last axis, then the
    /// residual, then `act`. Inputs: A, B, bias? (1-D, the output's last dim),
    /// residual? (exactly the output's shape).
    MatMul { act: FusedAct },
    /// Scaled dot-product attention over the last two axes, as the exporters
    /// spell it: `MatMul(Q, Kt)`, then `scale`, then `mask`, then Softmax
    /// along the last axis, then `MatMul(., V)`. Inputs: Q `[..., S, D]`,
    /// Kt `[..., D, T]`, V `[..., T, E]` (the same leading dims), mask?
    /// (broadcast to `[..., S, T]`: added for [`AttnMask::Add`], a bool
    /// condition for [`AttnMask::Where`]). Output `[..., S, E]`. `layout`
    /// names the head Transposes absorbed around the core.
    Attention {
        scale: AttnScale,
        mask: AttnMask,
        layout: AttnLayout,
    },
}

/// Transposes absorbed into a [`FusedOp::Attention`] node, so the head
/// split and merge around the core cost no copies. `None`: no Transpose
/// there.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttnLayout {
    /// Q, Kt and V are `Transpose(input_i, perm_i)` of the node's inputs
    /// 0..3 (each a permutation of the input's rank).
    pub inputs: [Option<Vec<usize>>; 3],
    /// The node's output is its `[..., S, E]` result transposed by this
    /// permutation, which keeps the last axis last (output rows stay
    /// contiguous).
    pub out: Option<Vec<usize>>,
}

impl AttnLayout {
    /// `shape` transposed by `perm` (as is without one); `None` if `perm`
    /// is not a permutation of `shape`'s axes.
    pub fn permuted<T: Clone>(shape: &[T], perm: Option<&[usize]>) -> Option<Vec<T>> {
        let Some(p) = perm else {
            return Some(shape.to_vec());
        };
        let mut seen = vec![false; shape.len()];
        if p.len() != shape.len() {
            return None;
        }
        for &a in p {
            if a >= shape.len() || std::mem::replace(&mut seen[a], true) {
                return None;
            }
        }
        Some(p.iter().map(|&a| shape[a].clone()).collect())
    }
}

/// How attention scores are scaled before the mask: each exact as the op it
/// replaces (a Div stays a division).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttnScale {
    None,
    Mul(f32),
    Div(f32),
}

impl AttnScale {
    #[inline]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            AttnScale::None => v,
            AttnScale::Mul(c) => v * c,
            AttnScale::Div(c) => v / c,
        }
    }
}

/// The mask between scaling and Softmax.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttnMask {
    None,
    /// `scores + mask`.
    Add,
    /// `Where(mask, scores, fill)` (`keep_if_true`), or
    /// `Where(mask, fill, scores)` (not `keep_if_true`).
    Where {
        fill: f32,
        keep_if_true: bool,
    },
}

impl FusedOp {
    pub fn name(&self) -> &'static str {
        match self {
            FusedOp::Conv { .. } => "FusedConv",
            FusedOp::ConvNhwc { .. } => "FusedConvNhwc",
            FusedOp::PointwiseDepthwise { .. } => "FusedPointwiseDepthwise",
            FusedOp::MatMul { .. } => "FusedMatMul",
            FusedOp::Attention { .. } => "FusedAttention",
        }
    }

    pub fn act(&self) -> FusedAct {
        match self {
            FusedOp::Conv { act, .. }
            | FusedOp::ConvNhwc { act, .. }
            | FusedOp::PointwiseDepthwise { act, .. }
            | FusedOp::MatMul { act } => *act,
            FusedOp::Attention { .. } => FusedAct::Identity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_reference_matches_known_values() {
        // Values from Abramowitz & Stegun table 7.1.
        for (x, want) in [
            (0.0, 0.0),
            (1e-300, 1.128_379_167_095_512_6e-300),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.5, 0.999_999_256_901_627_7),
            (-1.0, -0.842_700_792_949_714_9),
        ] {
            assert!(
                (erf_f64(x) - want).abs() < 1e-14,
                "erf({x}) = {}",
                erf_f64(x)
            );
        }
    }

    #[test]
    fn activations_at_known_points() {
        assert_eq!(FusedAct::Relu.eval(-2.0), 0.0);
        assert_eq!(FusedAct::Clip { min: 0.0, max: 6.0 }.eval(7.0), 6.0);
        assert_eq!(FusedAct::HardSwish.eval(-4.0), 0.0);
        assert_eq!(FusedAct::HardSwish.eval(4.0), 4.0);
        assert_eq!(FusedAct::LeakyRelu { alpha: 0.1 }.eval(-2.0), -0.2);
        assert!((FusedAct::Sigmoid.eval(0.0) - 0.5).abs() < 1e-7);
        assert!((FusedAct::Silu.eval(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((FusedAct::GeluErf.eval(1.0) - 0.841_344_74).abs() < 1e-6);
        assert!((FusedAct::GeluTanh.eval(1.0) - 0.841_191_97).abs() < 1e-6);
    }
}
