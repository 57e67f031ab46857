//! Kernels for the `VisionOp` family (see `kiln_ir::op_vision`).

use crate::Result;
use kiln_ir::{Tensor, VisionOp};

/// Runs one op of the family on its present inputs.
pub fn run(op: &VisionOp, inputs: &[Option<&Tensor>], num_outputs: usize) -> Result<Vec<Tensor>> {
    let _ = (inputs, num_outputs);
    match *op {}
}
