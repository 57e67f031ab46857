//! kiln's CPU backend. Every op has a plain reference kernel here, written for
//! clarity and exactness first; optimized variants (SIMD, blocked GEMM) are added
//! beside them and tested against them.
//!
//! `run_op` is the single entry point: it takes an op, its present inputs and the
//! number of outputs the node uses, and returns the output tensors. Control flow
//! (If, Loop) is the runtime's job, since it needs to execute subgraphs.

mod attn;
pub mod buffers;
mod elementwise;
pub mod fastmath;
pub mod fused;
mod index;
mod nn;
pub mod prepared;
mod quant;
mod reduce;
mod resize;
mod rnn;
mod shape_ops;
mod text;
pub mod tune;
pub mod util;
mod vision;

use kiln_ir::{Op, Tensor};
pub use prepared::{prepare, prepare_gather_from, tied_table, PreparedOp};

/// Why a kernel could not produce its outputs.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The inputs are not valid for the op (wrong rank, clashing shapes, index out
    /// of range, ...).
    #[error("{0}")]
    Invalid(String),
    /// A valid case kiln does not implement yet (e.g. a dtype or mode).
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// Shorthand for returning `KernelError::Invalid` with a formatted message.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::KernelError::Invalid(format!($($arg)*)) };
}

/// Shorthand for returning `KernelError::Unsupported` with a formatted message.
#[macro_export]
macro_rules! unsupported {
    ($($arg:tt)*) => { $crate::KernelError::Unsupported(format!($($arg)*)) };
}

/// The input at `i`, or an error naming what is missing.
fn required<'a>(inputs: &[Option<&'a Tensor>], i: usize, what: &str) -> Result<&'a Tensor> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| invalid!("missing required input {i} ({what})"))
}

fn optional<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    inputs.get(i).copied().flatten()
}

/// For ops that only relabel their first input's shape (Reshape, Flatten,
/// Squeeze, Unsqueeze, Identity on a tensor): the output shape, with every
/// check `run_op` makes. The runtime uses it to move a tensor that nothing
/// else reads into the output instead of copying it. None for other ops.
pub fn view_shape(op: &Op, inputs: &[Option<&Tensor>]) -> Option<Result<Vec<usize>>> {
    let x = |i: usize, what: &str| required(inputs, i, what);
    let opt = |i: usize| optional(inputs, i);
    let shape = match op {
        Op::Reshape { allowzero } => {
            x(0, "data").and_then(|d| shape_ops::reshape_shape(d, x(1, "shape")?, *allowzero))
        }
        Op::Flatten { axis } => x(0, "input").and_then(|d| shape_ops::flatten_shape(d, *axis)),
        Op::Squeeze => x(0, "data").and_then(|d| shape_ops::squeeze_shape(d, opt(1))),
        Op::Unsqueeze => x(0, "data").and_then(|d| shape_ops::unsqueeze_shape(d, x(1, "axes")?)),
        Op::Identity => x(0, "input").map(|d| d.shape().to_vec()),
        _ => return None,
    };
    Some(shape)
}

/// Runs one op on concrete inputs. `inputs[i]` is `None` for an omitted optional
/// input; `num_outputs` is how many outputs the node declares (some ops compute
/// optional outputs only when asked).
pub fn run_op(op: &Op, inputs: &[Option<&Tensor>], num_outputs: usize) -> Result<Vec<Tensor>> {
    let x = |i: usize, what: &str| required(inputs, i, what);
    let opt = |i: usize| optional(inputs, i);
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Unary(u) => one(elementwise::unary(u, x(0, "X")?)?),
        Op::Binary(b) => one(elementwise::binary(*b, x(0, "A")?, x(1, "B")?)?),
        Op::Variadic(v) => {
            let all: Vec<&Tensor> = inputs.iter().copied().flatten().collect();
            one(elementwise::variadic(*v, &all)?)
        }
        Op::Clip => one(elementwise::clip(x(0, "input")?, opt(1), opt(2))?),
        Op::Where => one(elementwise::where_(
            x(0, "condition")?,
            x(1, "X")?,
            x(2, "Y")?,
        )?),
        Op::Cast { to } => one(elementwise::cast(x(0, "input")?, *to)?),
        Op::CastLike => {
            let target = x(1, "target_type")?;
            one(elementwise::cast(x(0, "input")?, target.dtype())?)
        }
        Op::Identity => one(x(0, "input")?.clone()),
        Op::Dropout => {
            let data = x(0, "data")?;
            let mut outs = vec![data.clone()];
            if num_outputs > 1 {
                let mask = Tensor::from_vec(data.shape().to_vec(), vec![true; data.len()])
                    .map_err(|e| invalid!("{e}"))?;
                outs.push(mask);
            }
            Ok(outs)
        }

        Op::Conv(a) => one(nn::conv(a, x(0, "X")?, x(1, "W")?, opt(2))?),
        Op::ConvTranspose(a) => one(nn::conv_transpose(a, x(0, "X")?, x(1, "W")?, opt(2))?),
        Op::BatchNormalization { epsilon } => one(nn::batch_norm(
            *epsilon,
            x(0, "X")?,
            x(1, "scale")?,
            x(2, "B")?,
            x(3, "input_mean")?,
            x(4, "input_var")?,
        )?),
        Op::InstanceNormalization { epsilon } => one(nn::instance_norm(
            *epsilon,
            x(0, "input")?,
            x(1, "scale")?,
            x(2, "B")?,
        )?),
        Op::LayerNormalization { axis, epsilon } => nn::layer_norm(
            *axis,
            *epsilon,
            x(0, "X")?,
            x(1, "Scale")?,
            opt(2),
            num_outputs,
        ),
        Op::MaxPool(a) => nn::max_pool(a, x(0, "X")?, num_outputs),
        Op::AveragePool(a) => one(nn::avg_pool(a, x(0, "X")?)?),
        Op::GlobalAveragePool => one(nn::global_pool(x(0, "X")?, false)?),
        Op::GlobalMaxPool => one(nn::global_pool(x(0, "X")?, true)?),
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => one(nn::gemm(
            *alpha,
            *beta,
            *trans_a,
            *trans_b,
            x(0, "A")?,
            x(1, "B")?,
            opt(2),
        )?),
        Op::MatMul => one(nn::matmul(x(0, "A")?, x(1, "B")?)?),
        Op::Fused(f) => one(fused::run(f, inputs)?),
        Op::Softmax { axis, coerce_2d } => {
            one(nn::softmax(x(0, "input")?, *axis, *coerce_2d, false)?)
        }
        Op::LogSoftmax { axis, coerce_2d } => {
            one(nn::softmax(x(0, "input")?, *axis, *coerce_2d, true)?)
        }
        Op::Resize(a) => one(resize::resize(a, x(0, "X")?, opt(1), opt(2), opt(3))?),
        Op::Lstm(a) => rnn::lstm(a, inputs, num_outputs),

        Op::Reshape { allowzero } => one(shape_ops::reshape(
            x(0, "data")?,
            x(1, "shape")?,
            *allowzero,
        )?),
        Op::Flatten { axis } => one(shape_ops::flatten(x(0, "input")?, *axis)?),
        Op::Transpose { perm } => one(shape_ops::transpose(x(0, "data")?, perm.as_deref())?),
        Op::Squeeze => one(shape_ops::squeeze(x(0, "data")?, opt(1))?),
        Op::Unsqueeze => one(shape_ops::unsqueeze(x(0, "data")?, x(1, "axes")?)?),
        Op::Concat { axis } => {
            let all: Vec<&Tensor> = inputs.iter().copied().flatten().collect();
            one(shape_ops::concat(&all, *axis)?)
        }
        Op::Split {
            axis,
            num_outputs: n,
        } => {
            let parts = if opt(1).is_some() {
                num_outputs
            } else {
                (*n).max(num_outputs)
            };
            shape_ops::split(x(0, "input")?, opt(1), *axis, parts)
        }
        Op::Slice => one(shape_ops::slice(
            x(0, "data")?,
            x(1, "starts")?,
            x(2, "ends")?,
            opt(3),
            opt(4),
        )?),
        Op::Gather { axis } => one(shape_ops::gather(x(0, "data")?, x(1, "indices")?, *axis)?),
        Op::GatherElements { axis } => one(shape_ops::gather_elements(
            x(0, "data")?,
            x(1, "indices")?,
            *axis,
        )?),
        Op::Expand => one(shape_ops::expand(x(0, "input")?, x(1, "shape")?)?),
        Op::Pad { mode } => one(shape_ops::pad(
            *mode,
            x(0, "data")?,
            x(1, "pads")?,
            opt(2),
            opt(3),
        )?),
        Op::Shape { start, end } => one(shape_ops::shape(x(0, "data")?, *start, *end)),
        Op::Size => one(Tensor::scalar(x(0, "data")?.len() as i64)),
        Op::ConstantOfShape { value } => one(shape_ops::constant_of_shape(x(0, "input")?, value)?),
        Op::Range => one(shape_ops::range(
            x(0, "start")?,
            x(1, "limit")?,
            x(2, "delta")?,
        )?),
        Op::Tile => one(shape_ops::tile(x(0, "input")?, x(1, "repeats")?)?),
        Op::Trilu { upper } => one(shape_ops::trilu(x(0, "input")?, opt(1), *upper)?),
        Op::Reduce {
            op,
            keepdims,
            noop_with_empty_axes,
        } => one(reduce::reduce(
            *op,
            x(0, "data")?,
            opt(1),
            *keepdims,
            *noop_with_empty_axes,
        )?),
        Op::ArgMax {
            axis,
            keepdims,
            select_last_index,
        } => one(reduce::arg_extreme(
            x(0, "data")?,
            *axis,
            *keepdims,
            *select_last_index,
            true,
        )?),
        Op::ArgMin {
            axis,
            keepdims,
            select_last_index,
        } => one(reduce::arg_extreme(
            x(0, "data")?,
            *axis,
            *keepdims,
            *select_last_index,
            false,
        )?),
        Op::Quant(o) => quant::run(o, inputs, num_outputs),
        Op::Index(o) => index::run(o, inputs, num_outputs),
        Op::Vision(o) => vision::run(o, inputs, num_outputs),
        Op::Attn(o) => attn::run(o, inputs, num_outputs),
        Op::Text(o) => text::run(o, inputs, num_outputs),
        Op::If { .. } | Op::Loop { .. } | Op::Seq(_) => Err(invalid!(
            "{} is control flow and is executed by the runtime, not a kernel",
            op.name()
        )),
    }
}
