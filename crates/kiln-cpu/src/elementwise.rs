//! STUB: being written.
use crate::{unsupported, Result};
use kiln_ir::{BinaryOp, DType, Tensor, UnaryOp, VariadicOp};
pub fn unary(_op: &UnaryOp, _x: &Tensor) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn binary(_op: BinaryOp, _a: &Tensor, _b: &Tensor) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn variadic(_op: VariadicOp, _xs: &[&Tensor]) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn clip(_x: &Tensor, _min: Option<&Tensor>, _max: Option<&Tensor>) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn where_(_c: &Tensor, _x: &Tensor, _y: &Tensor) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
pub fn cast(_x: &Tensor, _to: DType) -> Result<Tensor> {
    Err(unsupported!("todo"))
}
