//! STUB: being written.
use crate::{unsupported, Result};
use kiln_ir::{LstmAttrs, Tensor};
pub fn lstm(_a: &LstmAttrs, _inputs: &[Option<&Tensor>], _n: usize) -> Result<Vec<Tensor>> {
    Err(unsupported!("todo"))
}
