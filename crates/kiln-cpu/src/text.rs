//! Kernels for the `TextOp` family (see `kiln_ir::op_text`).

use crate::Result;
use kiln_ir::{Tensor, TextOp};

/// Runs one op of the family on its present inputs.
pub fn run(op: &TextOp, inputs: &[Option<&Tensor>], num_outputs: usize) -> Result<Vec<Tensor>> {
    let _ = (inputs, num_outputs);
    match *op {}
}
