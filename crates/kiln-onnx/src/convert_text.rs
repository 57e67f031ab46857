//! ONNX nodes of the `op_text` family (see `kiln_ir::op_text`) -> `Op`.

use crate::convert::NodeCtx;
use crate::Result;
use kiln_ir::Op;

/// Parses the node if `op_type` belongs to this family; `Ok(None)` when it does not.
pub(crate) fn convert(op_type: &str, ctx: &mut NodeCtx) -> Result<Option<Op>> {
    let _ = ctx;
    Ok(match op_type {
        _ => None,
    })
}
