//! Kernels for the `IndexOp` family (see `kiln_ir::op_index`).

use crate::Result;
use kiln_ir::{IndexOp, Tensor};

/// Runs one op of the family on its present inputs.
pub fn run(op: &IndexOp, inputs: &[Option<&Tensor>], num_outputs: usize) -> Result<Vec<Tensor>> {
    let _ = (inputs, num_outputs);
    match *op {}
}
