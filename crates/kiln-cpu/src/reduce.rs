//! STUB: being written.
use crate::{unsupported, Result};
use kiln_ir::{ReduceOp, Tensor};
pub fn reduce(
    _op: ReduceOp,
    _x: &Tensor,
    _axes: Option<&Tensor>,
    _keepdims: bool,
    _noop: bool,
) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn arg_extreme(
    _x: &Tensor,
    _axis: i64,
    _keepdims: bool,
    _last: bool,
    _is_max: bool,
) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
