//! Kernels for the `QuantOp` family (see `kiln_ir::op_quant`).

use crate::Result;
use kiln_ir::{QuantOp, Tensor};

/// Runs one op of the family on its present inputs.
pub fn run(op: &QuantOp, inputs: &[Option<&Tensor>], num_outputs: usize) -> Result<Vec<Tensor>> {
    let _ = (inputs, num_outputs);
    match *op {}
}
