//! Request pieces shared by the REST and gRPC front ends.

use crate::error::{SResult, ServeError};
use crate::protocol::{datatype_name, parse_datatype, parse_shape};
use crate::repository::ServedModel;
use kiln_ir::{DType, Tensor};

/// Checks a declared input against the model (name, datatype, shape sanity)
/// before any of its data is decoded.
pub fn declared_input(
    model: &ServedModel,
    name: &str,
    datatype: &str,
    shape: &[i64],
) -> SResult<(DType, Vec<usize>, usize)> {
    let info = model.input_info(name)?;
    let dtype = parse_datatype(datatype)?;
    if dtype != info.dtype {
        return Err(ServeError::bad(format!(
            "input '{name}' must be {} but {datatype} was given",
            datatype_name(info.dtype)
        )));
    }
    let (dims, numel) = parse_shape(shape, name)?;
    Ok((dtype, dims, numel))
}

/// Checks requested output names against the model.
pub fn check_outputs<'a>(model: &ServedModel, names: impl Iterator<Item = &'a str>) -> SResult<()> {
    let session = model.session()?;
    for n in names {
        if !session.outputs().iter().any(|o| o.name == n) {
            let all: Vec<&str> = session.outputs().iter().map(|o| o.name.as_str()).collect();
            return Err(ServeError::bad(format!(
                "model '{}' has no output named '{n}'; its outputs are: {}",
                model.name,
                all.join(", ")
            )));
        }
    }
    Ok(())
}

/// Keeps the requested outputs (all when none requested), in request order.
pub fn select_outputs(outs: Vec<(String, Tensor)>, requested: &[String]) -> Vec<(String, Tensor)> {
    if requested.is_empty() {
        return outs;
    }
    let mut outs: Vec<Option<(String, Tensor)>> = outs.into_iter().map(Some).collect();
    let mut picked = Vec::with_capacity(requested.len());
    for r in requested {
        if let Some(slot) = outs
            .iter_mut()
            .find(|o| o.as_ref().is_some_and(|(n, _)| n == r))
        {
            picked.extend(slot.take());
        }
    }
    picked
}
