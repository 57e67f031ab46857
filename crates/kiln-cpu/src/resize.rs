//! STUB: being written.
use crate::{unsupported, Result};
use kiln_ir::{ResizeAttrs, Tensor};
pub fn resize(
    _a: &ResizeAttrs,
    _x: &Tensor,
    _roi: Option<&Tensor>,
    _scales: Option<&Tensor>,
    _sizes: Option<&Tensor>,
) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
