//! The typed operator set. Every ONNX opset form of an operator is normalized by
//! the frontend into one variant here: attribute forms that later opsets moved to
//! inputs (axes, pads, split sizes, clip bounds, scales) always arrive as inputs,
//! so later stages never look at opset versions.

use crate::{AttnOp, DType, FusedOp, Graph, IndexOp, QuantOp, SeqOp, Tensor, TextOp, VisionOp};

/// Element-wise operators of one input.
#[derive(Clone, Debug, PartialEq)]
pub enum UnaryOp {
    Relu,
    Sigmoid,
    Tanh,
    Erf,
    Sqrt,
    Reciprocal,
    Exp,
    Log,
    Neg,
    Abs,
    Floor,
    Ceil,
    /// Round half to even.
    Round,
    Sign,
    Sin,
    Cos,
    Tan,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Asinh,
    Acosh,
    Atanh,
    Softplus,
    Softsign,
    HardSwish,
    Mish,
    Not,
    BitwiseNot,
    IsNaN,
    IsInf {
        detect_positive: bool,
        detect_negative: bool,
    },
    LeakyRelu {
        alpha: f32,
    },
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    Elu {
        alpha: f32,
    },
    Selu {
        alpha: f32,
        gamma: f32,
    },
    Celu {
        alpha: f32,
    },
    ThresholdedRelu {
        alpha: f32,
    },
    /// `tanh_approx` selects the tanh approximation instead of the exact erf form.
    Gelu {
        tanh_approx: bool,
    },
}

/// Element-wise operators of two inputs with numpy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    /// `fmod` selects C fmod semantics (sign of the dividend) over Python's.
    Mod {
        fmod: bool,
    },
    Max,
    Min,
    Equal,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    And,
    Or,
    Xor,
    BitShiftLeft,
    BitShiftRight,
    BitwiseAnd,
    BitwiseOr,
    BitwiseXor,
    /// PRelu: x if x >= 0 else slope * x, slope broadcast to x.
    PRelu,
}

impl BinaryOp {
    /// Whether the result is bool regardless of the input type.
    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryOp::Equal
                | BinaryOp::Less
                | BinaryOp::LessOrEqual
                | BinaryOp::Greater
                | BinaryOp::GreaterOrEqual
                | BinaryOp::And
                | BinaryOp::Or
                | BinaryOp::Xor
        )
    }
}

/// N-ary element-wise operators with broadcasting (Sum, Mean, Max, Min).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VariadicOp {
    Sum,
    Mean,
    Max,
    Min,
}

/// Reductions over the axes given by the optional second input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    LogSum,
    LogSumExp,
    SumSquare,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

/// Attributes shared by Conv and ConvTranspose. Empty vectors mean "default for
/// the input's rank" (ones for strides and dilations, zeros for pads, kernel
/// shape from the weight).
#[derive(Clone, Debug, PartialEq)]
pub struct ConvAttrs {
    pub auto_pad: AutoPad,
    pub dilations: Vec<usize>,
    pub group: usize,
    pub kernel_shape: Vec<usize>,
    /// `[x1_begin, x2_begin, ..., x1_end, x2_end, ...]` as in ONNX.
    pub pads: Vec<usize>,
    pub strides: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ConvTransposeAttrs {
    pub conv: ConvAttrs,
    pub output_padding: Vec<usize>,
    pub output_shape: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolAttrs {
    pub auto_pad: AutoPad,
    pub ceil_mode: bool,
    pub dilations: Vec<usize>,
    pub kernel_shape: Vec<usize>,
    pub pads: Vec<usize>,
    pub strides: Vec<usize>,
    /// AveragePool only: whether padded cells count in the divisor.
    pub count_include_pad: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResizeMode {
    Nearest,
    Linear,
    Cubic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoordTransform {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfCropAndResize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NearestMode {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeepAspect {
    Stretch,
    NotLarger,
    NotSmaller,
}

/// Resize (and Upsample, normalized to it). Inputs: X, roi?, scales?, sizes?.
#[derive(Clone, Debug, PartialEq)]
pub struct ResizeAttrs {
    pub mode: ResizeMode,
    pub coord: CoordTransform,
    pub nearest: NearestMode,
    pub cubic_coeff_a: f32,
    pub exclude_outside: bool,
    pub extrapolation_value: f32,
    pub antialias: bool,
    /// Axes the scales/sizes apply to; empty means all.
    pub axes: Vec<i64>,
    pub keep_aspect_ratio: KeepAspect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PadMode {
    Constant,
    Reflect,
    Edge,
    Wrap,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RnnDirection {
    Forward,
    Reverse,
    Bidirectional,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    Sigmoid,
    Tanh,
    Relu,
}

/// LSTM attributes. Inputs: X, W, R, B?, sequence_lens?, initial_h?, initial_c?, P?.
#[derive(Clone, Debug, PartialEq)]
pub struct LstmAttrs {
    pub direction: RnnDirection,
    pub hidden_size: usize,
    /// f, g, h per direction (defaults Sigmoid, Tanh, Tanh).
    pub activations: Vec<Activation>,
    pub clip: Option<f32>,
    pub input_forget: bool,
    /// 1: batch-major `[B, S, ...]` tensors instead of `[S, B, ...]`.
    pub layout: i64,
}

/// One operator with its parsed attributes. Input conventions follow the newest
/// ONNX opset of each operator.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Unary(UnaryOp),
    Binary(BinaryOp),
    Variadic(VariadicOp),
    /// Inputs: x, min?, max?.
    Clip,
    /// Inputs: condition, x, y.
    Where,
    Cast {
        to: DType,
    },
    /// Inputs: x, target (whose dtype is the result dtype).
    CastLike,
    Identity,
    /// Inference-mode Dropout: identity, plus an all-true mask if asked for.
    Dropout,

    Conv(ConvAttrs),
    ConvTranspose(ConvTransposeAttrs),
    /// Inputs: x, scale, bias, mean, var.
    BatchNormalization {
        epsilon: f32,
    },
    InstanceNormalization {
        epsilon: f32,
    },
    /// Inputs: x, scale, bias?.
    LayerNormalization {
        axis: i64,
        epsilon: f32,
    },
    MaxPool(PoolAttrs),
    AveragePool(PoolAttrs),
    GlobalAveragePool,
    GlobalMaxPool,
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    MatMul,
    /// `coerce_2d`: opset < 13 semantics (flatten to 2-D at `axis`).
    Softmax {
        axis: i64,
        coerce_2d: bool,
    },
    LogSoftmax {
        axis: i64,
        coerce_2d: bool,
    },
    Resize(ResizeAttrs),
    Lstm(LstmAttrs),

    /// Inputs: data, shape.
    Reshape {
        allowzero: bool,
    },
    Flatten {
        axis: i64,
    },
    /// `None`: reverse the axes.
    Transpose {
        perm: Option<Vec<i64>>,
    },
    /// Inputs: data, axes?.
    Squeeze,
    /// Inputs: data, axes.
    Unsqueeze,
    Concat {
        axis: i64,
    },
    /// Inputs: x, split?. With no split input, `num_outputs` equal parts
    /// (the last one smaller when the axis does not divide evenly).
    Split {
        axis: i64,
        num_outputs: usize,
    },
    /// Inputs: data, starts, ends, axes?, steps?.
    Slice,
    /// Inputs: data, indices.
    Gather {
        axis: i64,
    },
    GatherElements {
        axis: i64,
    },
    /// Inputs: input, shape.
    Expand,
    /// Inputs: data, pads, constant_value?, axes?.
    Pad {
        mode: PadMode,
    },
    Shape {
        start: i64,
        end: Option<i64>,
    },
    Size,
    /// Input: shape. `value` is a one-element tensor (default f32 zero).
    ConstantOfShape {
        value: Tensor,
    },
    /// Inputs: start, limit, delta.
    Range,
    /// Inputs: input, repeats.
    Tile,
    /// Inputs: input, k?.
    Trilu {
        upper: bool,
    },
    /// Inputs: data, axes?.
    Reduce {
        op: ReduceOp,
        keepdims: bool,
        noop_with_empty_axes: bool,
    },
    ArgMax {
        axis: i64,
        keepdims: bool,
        select_last_index: bool,
    },
    ArgMin {
        axis: i64,
        keepdims: bool,
        select_last_index: bool,
    },

    /// Input: cond. Branches may read values of the enclosing graphs.
    If {
        then_branch: Box<Graph>,
        else_branch: Box<Graph>,
    },
    /// Inputs: M?, cond?, v_initial... Body: (iter, cond, v...) -> (cond, v..., scan...).
    Loop {
        body: Box<Graph>,
    },

    // Op families, each in its own module (see `op_*.rs`).
    Quant(QuantOp),
    Index(IndexOp),
    Vision(VisionOp),
    Attn(AttnOp),
    Seq(SeqOp),
    Text(TextOp),
    /// kiln's own fused ops, made by the optimizer (never in a model file).
    Fused(FusedOp),
}

impl Op {
    /// The ONNX operator name this op came from (for messages and histograms).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Unary(u) => match u {
                UnaryOp::Relu => "Relu",
                UnaryOp::Sigmoid => "Sigmoid",
                UnaryOp::Tanh => "Tanh",
                UnaryOp::Erf => "Erf",
                UnaryOp::Sqrt => "Sqrt",
                UnaryOp::Reciprocal => "Reciprocal",
                UnaryOp::Exp => "Exp",
                UnaryOp::Log => "Log",
                UnaryOp::Neg => "Neg",
                UnaryOp::Abs => "Abs",
                UnaryOp::Floor => "Floor",
                UnaryOp::Ceil => "Ceil",
                UnaryOp::Round => "Round",
                UnaryOp::Sign => "Sign",
                UnaryOp::Sin => "Sin",
                UnaryOp::Cos => "Cos",
                UnaryOp::Tan => "Tan",
                UnaryOp::Asin => "Asin",
                UnaryOp::Acos => "Acos",
                UnaryOp::Atan => "Atan",
                UnaryOp::Sinh => "Sinh",
                UnaryOp::Cosh => "Cosh",
                UnaryOp::Asinh => "Asinh",
                UnaryOp::Acosh => "Acosh",
                UnaryOp::Atanh => "Atanh",
                UnaryOp::Softplus => "Softplus",
                UnaryOp::Softsign => "Softsign",
                UnaryOp::HardSwish => "HardSwish",
                UnaryOp::Mish => "Mish",
                UnaryOp::Not => "Not",
                UnaryOp::BitwiseNot => "BitwiseNot",
                UnaryOp::IsNaN => "IsNaN",
                UnaryOp::IsInf { .. } => "IsInf",
                UnaryOp::LeakyRelu { .. } => "LeakyRelu",
                UnaryOp::HardSigmoid { .. } => "HardSigmoid",
                UnaryOp::Elu { .. } => "Elu",
                UnaryOp::Selu { .. } => "Selu",
                UnaryOp::Celu { .. } => "Celu",
                UnaryOp::ThresholdedRelu { .. } => "ThresholdedRelu",
                UnaryOp::Gelu { .. } => "Gelu",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "Add",
                BinaryOp::Sub => "Sub",
                BinaryOp::Mul => "Mul",
                BinaryOp::Div => "Div",
                BinaryOp::Pow => "Pow",
                BinaryOp::Mod { .. } => "Mod",
                BinaryOp::Max => "Max",
                BinaryOp::Min => "Min",
                BinaryOp::Equal => "Equal",
                BinaryOp::Less => "Less",
                BinaryOp::LessOrEqual => "LessOrEqual",
                BinaryOp::Greater => "Greater",
                BinaryOp::GreaterOrEqual => "GreaterOrEqual",
                BinaryOp::And => "And",
                BinaryOp::Or => "Or",
                BinaryOp::Xor => "Xor",
                BinaryOp::BitShiftLeft | BinaryOp::BitShiftRight => "BitShift",
                BinaryOp::BitwiseAnd => "BitwiseAnd",
                BinaryOp::BitwiseOr => "BitwiseOr",
                BinaryOp::BitwiseXor => "BitwiseXor",
                BinaryOp::PRelu => "PRelu",
            },
            Op::Variadic(v) => match v {
                VariadicOp::Sum => "Sum",
                VariadicOp::Mean => "Mean",
                VariadicOp::Max => "Max",
                VariadicOp::Min => "Min",
            },
            Op::Clip => "Clip",
            Op::Where => "Where",
            Op::Cast { .. } => "Cast",
            Op::CastLike => "CastLike",
            Op::Identity => "Identity",
            Op::Dropout => "Dropout",
            Op::Conv(_) => "Conv",
            Op::ConvTranspose(_) => "ConvTranspose",
            Op::BatchNormalization { .. } => "BatchNormalization",
            Op::InstanceNormalization { .. } => "InstanceNormalization",
            Op::LayerNormalization { .. } => "LayerNormalization",
            Op::MaxPool(_) => "MaxPool",
            Op::AveragePool(_) => "AveragePool",
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::GlobalMaxPool => "GlobalMaxPool",
            Op::Gemm { .. } => "Gemm",
            Op::MatMul => "MatMul",
            Op::Softmax { .. } => "Softmax",
            Op::LogSoftmax { .. } => "LogSoftmax",
            Op::Resize(_) => "Resize",
            Op::Lstm(_) => "LSTM",
            Op::Reshape { .. } => "Reshape",
            Op::Flatten { .. } => "Flatten",
            Op::Transpose { .. } => "Transpose",
            Op::Squeeze => "Squeeze",
            Op::Unsqueeze => "Unsqueeze",
            Op::Concat { .. } => "Concat",
            Op::Split { .. } => "Split",
            Op::Slice => "Slice",
            Op::Gather { .. } => "Gather",
            Op::GatherElements { .. } => "GatherElements",
            Op::Expand => "Expand",
            Op::Pad { .. } => "Pad",
            Op::Shape { .. } => "Shape",
            Op::Size => "Size",
            Op::ConstantOfShape { .. } => "ConstantOfShape",
            Op::Range => "Range",
            Op::Tile => "Tile",
            Op::Trilu { .. } => "Trilu",
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "ReduceSum",
                ReduceOp::Mean => "ReduceMean",
                ReduceOp::Max => "ReduceMax",
                ReduceOp::Min => "ReduceMin",
                ReduceOp::Prod => "ReduceProd",
                ReduceOp::L1 => "ReduceL1",
                ReduceOp::L2 => "ReduceL2",
                ReduceOp::LogSum => "ReduceLogSum",
                ReduceOp::LogSumExp => "ReduceLogSumExp",
                ReduceOp::SumSquare => "ReduceSumSquare",
            },
            Op::ArgMax { .. } => "ArgMax",
            Op::ArgMin { .. } => "ArgMin",
            Op::If { .. } => "If",
            Op::Loop { .. } => "Loop",
            Op::Quant(o) => o.name(),
            Op::Index(o) => o.name(),
            Op::Vision(o) => o.name(),
            Op::Attn(o) => o.name(),
            Op::Seq(o) => o.name(),
            Op::Text(o) => o.name(),
            Op::Fused(o) => o.name(),
        }
    }

    /// Subgraphs held by this op (If branches, Loop body).
    pub fn subgraphs(&self) -> Vec<&Graph> {
        match self {
            Op::If {
                then_branch,
                else_branch,
            } => vec![then_branch, else_branch],
            Op::Loop { body } => vec![body],
            Op::Seq(s) => s.subgraphs(),
            _ => vec![],
        }
    }
}
