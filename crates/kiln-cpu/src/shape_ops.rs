//! STUB: being written.
use crate::{unsupported, Result};
use kiln_ir::{PadMode, Tensor};
pub fn reshape(_x: &Tensor, _s: &Tensor, _allowzero: bool) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn flatten(_x: &Tensor, _axis: i64) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn transpose(_x: &Tensor, _perm: Option<&[i64]>) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn squeeze(_x: &Tensor, _axes: Option<&Tensor>) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn unsqueeze(_x: &Tensor, _axes: &Tensor) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn concat(_xs: &[&Tensor], _axis: i64) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn split(
    _x: &Tensor,
    _split: Option<&Tensor>,
    _axis: i64,
    _parts: usize,
) -> Result<Vec<Tensor>> {
    Err(unsupported!("todo"))
}
pub fn slice(
    _x: &Tensor,
    _starts: &Tensor,
    _ends: &Tensor,
    _axes: Option<&Tensor>,
    _steps: Option<&Tensor>,
) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn gather(_x: &Tensor, _idx: &Tensor, _axis: i64) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn gather_elements(_x: &Tensor, _idx: &Tensor, _axis: i64) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn expand(_x: &Tensor, _shape: &Tensor) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn pad(
    _mode: PadMode,
    _x: &Tensor,
    _pads: &Tensor,
    _value: Option<&Tensor>,
    _axes: Option<&Tensor>,
) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn shape(x: &Tensor, _start: i64, _end: Option<i64>) -> Tensor {
    Tensor::vector(x.shape().iter().map(|&d| d as i64).collect::<Vec<i64>>())
}
pub fn constant_of_shape(_shape: &Tensor, _value: &Tensor) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn range(_start: &Tensor, _limit: &Tensor, _delta: &Tensor) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn tile(_x: &Tensor, _repeats: &Tensor) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn trilu(_x: &Tensor, _k: Option<&Tensor>, _upper: bool) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
