//! STUB: being written.
use crate::{unsupported, Result};
use kiln_ir::{ConvAttrs, ConvTransposeAttrs, PoolAttrs, Tensor};
pub fn conv(_a: &ConvAttrs, _x: &Tensor, _w: &Tensor, _b: Option<&Tensor>) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn conv_transpose(
    _a: &ConvTransposeAttrs,
    _x: &Tensor,
    _w: &Tensor,
    _b: Option<&Tensor>,
) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn batch_norm(
    _eps: f32,
    _x: &Tensor,
    _s: &Tensor,
    _b: &Tensor,
    _m: &Tensor,
    _v: &Tensor,
) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn instance_norm(_eps: f32, _x: &Tensor, _s: &Tensor, _b: &Tensor) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn layer_norm(
    _axis: i64,
    _eps: f32,
    _x: &Tensor,
    _s: &Tensor,
    _b: Option<&Tensor>,
    _n: usize,
) -> Result<Vec<Tensor>> {
    Err(unsupported!("todo"))
}
pub fn max_pool(_a: &PoolAttrs, _x: &Tensor, _n: usize) -> Result<Vec<Tensor>> {
    Err(unsupported!("todo"))
}
pub fn avg_pool(_a: &PoolAttrs, _x: &Tensor) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn global_pool(_x: &Tensor, _is_max: bool) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn gemm(
    _alpha: f32,
    _beta: f32,
    _ta: bool,
    _tb: bool,
    _a: &Tensor,
    _b: &Tensor,
    _c: Option<&Tensor>,
) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn matmul(_a: &Tensor, _b: &Tensor) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn softmax(_x: &Tensor, _axis: i64, _coerce_2d: bool, _log: bool) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
