//! Kernels for the `AttnOp` family (see `kiln_ir::op_attn`).

use crate::Result;
use kiln_ir::{AttnOp, Tensor};

/// Runs one op of the family on its present inputs.
pub fn run(op: &AttnOp, inputs: &[Option<&Tensor>], num_outputs: usize) -> Result<Vec<Tensor>> {
    let _ = (inputs, num_outputs);
    match *op {}
}
