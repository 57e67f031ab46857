//! Open Inference Protocol v2 tensor encodings shared by REST and gRPC:
//! datatype names, raw (binary) little-endian buffers, and JSON `data` arrays.

use crate::error::{SResult, ServeError};
use half::{bf16, f16};
use kiln_ir::{checked_numel, DType, Dim, Tensor, TensorData};
use serde_json::Value;

/// The protocol's name for a dtype ("FP32", "INT64", "BOOL", "BYTES", ...).
pub fn datatype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "FP32",
        DType::F64 => "FP64",
        DType::F16 => "FP16",
        DType::BF16 => "BF16",
        DType::I8 => "INT8",
        DType::I16 => "INT16",
        DType::I32 => "INT32",
        DType::I64 => "INT64",
        DType::U8 => "UINT8",
        DType::U16 => "UINT16",
        DType::U32 => "UINT32",
        DType::U64 => "UINT64",
        DType::Bool => "BOOL",
        DType::String => "BYTES",
        // Low-precision types kiln holds as bit patterns have no protocol name.
        #[allow(unreachable_patterns)]
        _ => "UNSUPPORTED",
    }
}

pub fn parse_datatype(s: &str) -> SResult<DType> {
    DType::ALL
        .into_iter()
        .find(|d| datatype_name(*d) == s && s != "UNSUPPORTED")
        .ok_or_else(|| ServeError::bad(format!("unknown datatype '{s}'")))
}

/// Metadata dims: known sizes as-is, anything symbolic as -1.
pub fn metadata_shape(shape: Option<&[Dim]>) -> Vec<i64> {
    match shape {
        Some(dims) => dims
            .iter()
            .map(|d| match d {
                Dim::Known(v) => *v as i64,
                _ => -1,
            })
            .collect(),
        None => vec![-1],
    }
}

/// Validates a client-declared shape (no negative dims, element count fits).
pub fn parse_shape(shape: &[i64], name: &str) -> SResult<(Vec<usize>, usize)> {
    let mut dims = Vec::with_capacity(shape.len());
    for &d in shape {
        if d < 0 {
            return Err(ServeError::bad(format!(
                "input '{name}': shape {shape:?} has a negative dim"
            )));
        }
        dims.push(usize::try_from(d).map_err(|_| ServeError::bad("dim too large"))?);
    }
    let numel = checked_numel(&dims)
        .filter(|n| *n <= isize::MAX as usize / 16)
        .ok_or_else(|| ServeError::bad(format!("input '{name}': shape {shape:?} is too large")))?;
    Ok((dims, numel))
}

/// Decodes a raw little-endian buffer (BYTES: 4-byte length-prefixed elements).
pub fn tensor_from_raw(
    name: &str,
    dtype: DType,
    dims: Vec<usize>,
    numel: usize,
    raw: &[u8],
) -> SResult<Tensor> {
    if dtype == DType::String {
        let mut out = Vec::with_capacity(numel.min(raw.len() / 4 + 1));
        let mut rest = raw;
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err(ServeError::bad(format!(
                    "input '{name}': truncated BYTES element length"
                )));
            }
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            rest = &rest[4..];
            if rest.len() < len {
                return Err(ServeError::bad(format!(
                    "input '{name}': BYTES element of {len} bytes overruns the buffer"
                )));
            }
            let s = String::from_utf8(rest[..len].to_vec()).map_err(|_| {
                ServeError::bad(format!("input '{name}': BYTES element is not UTF-8"))
            })?;
            out.push(s);
            rest = &rest[len..];
        }
        if out.len() != numel {
            return Err(ServeError::bad(format!(
                "input '{name}': shape {dims:?} needs {numel} elements but the data holds {}",
                out.len()
            )));
        }
        return Tensor::new(dims, TensorData::String(out))
            .map_err(|e| ServeError::bad(e.to_string()));
    }
    let size = if dtype == DType::Bool {
        1
    } else {
        dtype.size()
    };
    let want = numel.saturating_mul(size);
    if raw.len() != want {
        return Err(ServeError::bad(format!(
            "input '{name}': shape {dims:?} of {} needs {want} bytes but {} were given",
            datatype_name(dtype),
            raw.len()
        )));
    }
    macro_rules! le {
        ($t:ty, $n:expr, $variant:ident) => {
            TensorData::$variant(
                raw.chunks_exact($n)
                    .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            )
        };
    }
    let data = match dtype {
        DType::F32 => le!(f32, 4, F32),
        DType::F64 => le!(f64, 8, F64),
        DType::F16 => TensorData::F16(
            raw.chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DType::BF16 => TensorData::BF16(
            raw.chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DType::I8 => TensorData::I8(raw.iter().map(|&b| b as i8).collect()),
        DType::I16 => le!(i16, 2, I16),
        DType::I32 => le!(i32, 4, I32),
        DType::I64 => le!(i64, 8, I64),
        DType::U8 => TensorData::U8(raw.to_vec()),
        DType::U16 => le!(u16, 2, U16),
        DType::U32 => le!(u32, 4, U32),
        DType::U64 => le!(u64, 8, U64),
        DType::Bool => TensorData::Bool(raw.iter().map(|&b| b != 0).collect()),
        #[allow(unreachable_patterns)]
        _ => return Err(unsupported(name, dtype)),
    };
    Tensor::new(dims, data).map_err(|e| ServeError::bad(e.to_string()))
}

fn unsupported(name: &str, dtype: DType) -> ServeError {
    ServeError::bad(format!(
        "'{name}': element type {dtype} is not supported by the protocol"
    ))
}

/// Encodes a tensor as the protocol's raw little-endian bytes.
pub fn tensor_to_raw(t: &Tensor) -> SResult<Vec<u8>> {
    tensor_to_raw_inner(t).ok_or_else(|| {
        ServeError::internal(format!(
            "output of type {} cannot be sent over the protocol",
            t.dtype()
        ))
    })
}

fn tensor_to_raw_inner(t: &Tensor) -> Option<Vec<u8>> {
    macro_rules! le {
        ($v:expr) => {
            $v.iter().flat_map(|x| x.to_le_bytes()).collect()
        };
    }
    Some(match t.data() {
        TensorData::F32(v) => le!(v),
        TensorData::F64(v) => le!(v),
        TensorData::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        TensorData::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        TensorData::I8(v) => v.iter().map(|&x| x as u8).collect(),
        TensorData::I16(v) => le!(v),
        TensorData::I32(v) => le!(v),
        TensorData::I64(v) => le!(v),
        TensorData::U8(v) => v.clone(),
        TensorData::U16(v) => le!(v),
        TensorData::U32(v) => le!(v),
        TensorData::U64(v) => le!(v),
        TensorData::Bool(v) => v.iter().map(|&b| b as u8).collect(),
        TensorData::String(v) => {
            let mut out = Vec::with_capacity(v.iter().map(|s| s.len() + 4).sum());
            for s in v {
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            out
        }
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

/// Flattens a JSON `data` value (nested or flat, row-major) into `out`.
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>, depth: usize, limit: usize) -> SResult<()> {
    if depth > 64 {
        return Err(ServeError::bad("tensor data is nested too deeply"));
    }
    match v {
        Value::Array(items) => {
            for it in items {
                flatten(it, out, depth + 1, limit)?;
                if out.len() > limit {
                    return Err(ServeError::bad(
                        "tensor data holds more elements than its shape",
                    ));
                }
            }
        }
        other => out.push(other),
    }
    Ok(())
}

fn nested_matches(v: &Value, dims: &[usize]) -> bool {
    match v {
        Value::Array(items) => {
            !dims.is_empty()
                && items.len() == dims[0]
                && items.iter().all(|i| nested_matches(i, &dims[1..]))
        }
        _ => dims.is_empty(),
    }
}

/// Builds a tensor from a JSON `data` value.
pub fn tensor_from_json(
    name: &str,
    dtype: DType,
    dims: Vec<usize>,
    numel: usize,
    data: &Value,
) -> SResult<Tensor> {
    // Nested data must have exactly the shape's structure; flat data is row-major.
    let nested = matches!(data, Value::Array(a) if a.iter().any(|x| x.is_array()));
    if nested && !nested_matches(data, &dims) {
        return Err(ServeError::bad(format!(
            "input '{name}': nested data does not have shape {dims:?}"
        )));
    }
    let mut flat = Vec::new();
    flatten(data, &mut flat, 0, numel)?;
    if flat.len() != numel {
        return Err(ServeError::bad(format!(
            "input '{name}': shape {dims:?} needs {numel} elements but data holds {}",
            flat.len()
        )));
    }
    let bad = |what: &str, v: &Value| {
        ServeError::bad(format!(
            "input '{name}': element {v} is not {what} ({})",
            datatype_name(dtype)
        ))
    };
    macro_rules! ints {
        ($t:ty, $variant:ident) => {{
            let mut out = Vec::with_capacity(numel);
            for v in &flat {
                let x = if let Some(i) = v.as_i64() {
                    <$t>::try_from(i).ok()
                } else if let Some(u) = v.as_u64() {
                    <$t>::try_from(u).ok()
                } else {
                    None
                };
                out.push(x.ok_or_else(|| bad("an integer in range", v))?);
            }
            TensorData::$variant(out)
        }};
    }
    macro_rules! floats {
        ($variant:ident, $conv:expr) => {{
            let mut out = Vec::with_capacity(numel);
            for v in &flat {
                let x = v.as_f64().ok_or_else(|| bad("a number", v))?;
                out.push($conv(x));
            }
            TensorData::$variant(out)
        }};
    }
    let td = match dtype {
        DType::F32 => floats!(F32, |x: f64| x as f32),
        DType::F64 => floats!(F64, |x: f64| x),
        DType::F16 => floats!(F16, f16::from_f64),
        DType::BF16 => floats!(BF16, bf16::from_f64),
        DType::I8 => ints!(i8, I8),
        DType::I16 => ints!(i16, I16),
        DType::I32 => ints!(i32, I32),
        DType::I64 => ints!(i64, I64),
        DType::U8 => ints!(u8, U8),
        DType::U16 => ints!(u16, U16),
        DType::U32 => ints!(u32, U32),
        DType::U64 => ints!(u64, U64),
        DType::Bool => {
            let mut out = Vec::with_capacity(numel);
            for v in &flat {
                out.push(v.as_bool().ok_or_else(|| bad("a boolean", v))?);
            }
            TensorData::Bool(out)
        }
        DType::String => {
            let mut out = Vec::with_capacity(numel);
            for v in &flat {
                out.push(v.as_str().ok_or_else(|| bad("a string", v))?.to_string());
            }
            TensorData::String(out)
        }
        #[allow(unreachable_patterns)]
        _ => return Err(unsupported(name, dtype)),
    };
    Tensor::new(dims, td).map_err(|e| ServeError::bad(e.to_string()))
}

/// A tensor's elements as a flat JSON array.
pub fn tensor_to_json(t: &Tensor) -> SResult<Value> {
    fn num(x: f64) -> Value {
        serde_json::Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
    let arr: Vec<Value> = match t.data() {
        TensorData::F32(v) => v.iter().map(|&x| num(x as f64)).collect(),
        TensorData::F64(v) => v.iter().map(|&x| num(x)).collect(),
        TensorData::F16(v) => v.iter().map(|x| num(x.to_f64())).collect(),
        TensorData::BF16(v) => v.iter().map(|x| num(x.to_f64())).collect(),
        TensorData::I8(v) => v.iter().map(|&x| Value::from(x)).collect(),
        TensorData::I16(v) => v.iter().map(|&x| Value::from(x)).collect(),
        TensorData::I32(v) => v.iter().map(|&x| Value::from(x)).collect(),
        TensorData::I64(v) => v.iter().map(|&x| Value::from(x)).collect(),
        TensorData::U8(v) => v.iter().map(|&x| Value::from(x)).collect(),
        TensorData::U16(v) => v.iter().map(|&x| Value::from(x)).collect(),
        TensorData::U32(v) => v.iter().map(|&x| Value::from(x)).collect(),
        TensorData::U64(v) => v.iter().map(|&x| Value::from(x)).collect(),
        TensorData::Bool(v) => v.iter().map(|&x| Value::from(x)).collect(),
        TensorData::String(v) => v.iter().map(|x| Value::from(x.as_str())).collect(),
        #[allow(unreachable_patterns)]
        _ => {
            return Err(ServeError::internal(format!(
                "output of type {} cannot be sent over the protocol",
                t.dtype()
            )))
        }
    };
    Ok(Value::Array(arr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_round_trip() {
        let t = Tensor::from_vec(vec![2, 2], vec![1.0f32, -2.0, 3.5, 0.0]).unwrap();
        let raw = tensor_to_raw(&t).unwrap();
        let back = tensor_from_raw("x", DType::F32, vec![2, 2], 4, &raw).unwrap();
        assert_eq!(t, back);
        let s = Tensor::from_vec(vec![2], vec!["ab".to_string(), "".to_string()]).unwrap();
        let raw = tensor_to_raw(&s).unwrap();
        assert_eq!(
            tensor_from_raw("s", DType::String, vec![2], 2, &raw).unwrap(),
            s
        );
        assert!(tensor_from_raw("s", DType::String, vec![2], 2, &raw[..raw.len() - 1]).is_err());
        assert!(tensor_from_raw("x", DType::F32, vec![2, 2], 4, &[0u8; 15]).is_err());
    }

    #[test]
    fn json_nested_and_flat() {
        let nested: Value = serde_json::json!([[1, 2], [3, 4]]);
        let flat: Value = serde_json::json!([1, 2, 3, 4]);
        let a = tensor_from_json("x", DType::I64, vec![2, 2], 4, &nested).unwrap();
        let b = tensor_from_json("x", DType::I64, vec![2, 2], 4, &flat).unwrap();
        assert_eq!(a, b);
        assert!(tensor_from_json(
            "x",
            DType::I64,
            vec![2, 2],
            4,
            &serde_json::json!([1.5, 2, 3, 4])
        )
        .is_err());
        assert!(tensor_from_json("x", DType::U8, vec![1], 1, &serde_json::json!([300])).is_err());
        assert!(tensor_from_json("x", DType::F32, vec![3], 3, &flat).is_err());
        let wrong_nesting: Value = serde_json::json!([[1, 2, 3, 4]]);
        assert!(tensor_from_json("x", DType::I64, vec![2, 2], 4, &wrong_nesting).is_err());
        assert!(parse_shape(&[1 << 40, 1 << 40], "x").is_err());
        assert!(parse_shape(&[-1], "x").is_err());
    }
}
