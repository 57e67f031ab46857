//! Values as serialized protobufs in the layout of the ONNX test data
//! (`input_<i>.pb` / `output_<i>.pb`): a TensorProto for a tensor, a
//! SequenceProto for a sequence, an OptionalProto for an optional. A file does
//! not say which of the three it holds, so reading takes the declared type.

use crate::value::Value;
use crate::{Error, Result};
use kiln_ir::{DType, ValueKind};
use kiln_onnx::proto::{OptionalProto, SequenceProto, TensorProto};
use kiln_onnx::{tensor_from_proto, tensor_to_proto, TensorLimits};
use prost::Message;

// SequenceProto.DataType / OptionalProto.DataType codes.
const UNDEFINED: i32 = 0;
const TENSOR: i32 = 1;
const SEQUENCE: i32 = 3;
const OPTIONAL: i32 = 5;
/// Deepest nesting of optionals read.
const MAX_DEPTH: usize = 8;

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::Input(msg.to_string())
}

fn tensor(p: &TensorProto) -> Result<kiln_ir::Tensor> {
    tensor_from_proto(
        p,
        &TensorLimits {
            base_dir: None,
            max_tensor_bytes: usize::MAX,
        },
    )
    .map_err(bad)
}

/// Decodes `bytes` as a value of kind `kind` whose tensors are `dtype` (the
/// declared type of the input it is for; `dtype` gives an empty sequence its
/// element type). A tensor kind reads a TensorProto.
pub fn read_value_pb(bytes: &[u8], kind: &ValueKind, dtype: DType) -> Result<Value> {
    match kind {
        ValueKind::Tensor => kiln_onnx::read_tensor_pb(bytes)
            .map(Value::Tensor)
            .map_err(bad),
        ValueKind::Sequence(inner) => {
            let p = SequenceProto::decode(bytes)
                .map_err(|e| bad(format!("not a valid ONNX SequenceProto: {e}")))?;
            sequence(&p, inner, dtype)
        }
        ValueKind::Optional(inner) => {
            let p = OptionalProto::decode(bytes)
                .map_err(|e| bad(format!("not a valid ONNX OptionalProto: {e}")))?;
            optional(&p, inner, dtype, 0)
        }
    }
}

fn sequence(p: &SequenceProto, inner: &ValueKind, dtype: DType) -> Result<Value> {
    if *inner != ValueKind::Tensor {
        return Err(Error::Unsupported {
            node: "-".into(),
            op: "input".into(),
            message: "sequences of sequences, maps or optionals".into(),
        });
    }
    let code = p.elem_type.unwrap_or(UNDEFINED);
    let others = p.sparse_tensor_values.len()
        + p.sequence_values.len()
        + p.map_values.len()
        + p.optional_values.len();
    if !(code == TENSOR || code == UNDEFINED && p.tensor_values.is_empty()) || others > 0 {
        return Err(bad(format!(
            "the SequenceProto holds elements of type code {code}, not tensors"
        )));
    }
    let tensors = p
        .tensor_values
        .iter()
        .map(tensor)
        .collect::<Result<Vec<_>>>()?;
    let dtype = tensors.first().map(|t| t.dtype()).unwrap_or(dtype);
    Value::sequence(dtype, tensors)
        .ok_or_else(|| bad("the SequenceProto's tensors have different element types"))
}

fn optional(p: &OptionalProto, inner: &ValueKind, dtype: DType, depth: usize) -> Result<Value> {
    let code = p.elem_type.unwrap_or(UNDEFINED);
    let missing = |what: &str| bad(format!("the OptionalProto says {what} but holds none"));
    let content = match code {
        UNDEFINED => return Ok(Value::Optional(None)),
        TENSOR => Value::Tensor(tensor(
            p.tensor_value.as_ref().ok_or_else(|| missing("tensor"))?,
        )?),
        SEQUENCE => {
            let elem = match inner {
                ValueKind::Sequence(k) => k,
                _ => &ValueKind::Tensor,
            };
            sequence(
                p.sequence_value.as_ref().ok_or_else(|| missing("sequence"))?,
                elem,
                dtype,
            )?
        }
        OPTIONAL if depth < MAX_DEPTH => {
            let elem = match inner {
                ValueKind::Optional(k) => k,
                _ => &ValueKind::Tensor,
            };
            optional(
                p.optional_value.as_deref().ok_or_else(|| missing("optional"))?,
                elem,
                dtype,
                depth + 1,
            )?
        }
        other => {
            return Err(bad(format!(
                "the OptionalProto holds a value of type code {other} (sparse tensors and maps are not supported)"
            )))
        }
    };
    Ok(Value::Optional(Some(Box::new(content))))
}

/// Encodes `value` as a TensorProto, SequenceProto or OptionalProto named `name`.
pub fn write_value_pb(value: &Value, name: &str) -> Vec<u8> {
    match value {
        Value::Tensor(t) => kiln_onnx::write_tensor_pb(t, name),
        Value::Sequence { tensors, .. } => sequence_proto(tensors, Some(name)).encode_to_vec(),
        Value::Optional(v) => optional_proto(v.as_deref(), Some(name)).encode_to_vec(),
    }
}

fn sequence_proto(tensors: &[kiln_ir::Tensor], name: Option<&str>) -> SequenceProto {
    SequenceProto {
        name: name.map(str::to_string),
        elem_type: Some(TENSOR),
        tensor_values: tensors.iter().map(|t| tensor_to_proto(t, "")).collect(),
        ..Default::default()
    }
}

fn optional_proto(v: Option<&Value>, name: Option<&str>) -> OptionalProto {
    let mut p = OptionalProto {
        name: name.map(str::to_string),
        elem_type: Some(UNDEFINED),
        ..Default::default()
    };
    match v {
        None => {}
        Some(Value::Tensor(t)) => {
            p.elem_type = Some(TENSOR);
            p.tensor_value = Some(tensor_to_proto(t, ""));
        }
        Some(Value::Sequence { tensors, .. }) => {
            p.elem_type = Some(SEQUENCE);
            p.sequence_value = Some(sequence_proto(tensors, None));
        }
        Some(Value::Optional(inner)) => {
            p.elem_type = Some(OPTIONAL);
            p.optional_value = Some(Box::new(optional_proto(inner.as_deref(), None)));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::Tensor;

    fn seq_kind() -> ValueKind {
        ValueKind::Sequence(Box::new(ValueKind::Tensor))
    }

    #[test]
    fn round_trips_every_kind() {
        let s = Value::sequence(
            DType::I64,
            vec![Tensor::vector(vec![1i64, 2]), Tensor::scalar(3i64)],
        )
        .unwrap();
        let bytes = write_value_pb(&s, "s");
        assert_eq!(read_value_pb(&bytes, &seq_kind(), DType::I64).unwrap(), s);

        let empty = Value::sequence(DType::F32, vec![]).unwrap();
        let bytes = write_value_pb(&empty, "e");
        assert_eq!(
            read_value_pb(&bytes, &seq_kind(), DType::F32).unwrap(),
            empty
        );

        let opt_kind = ValueKind::Optional(Box::new(seq_kind()));
        let o = Value::Optional(Some(Box::new(s.clone())));
        let bytes = write_value_pb(&o, "o");
        assert_eq!(read_value_pb(&bytes, &opt_kind, DType::I64).unwrap(), o);
        let none = Value::Optional(None);
        let bytes = write_value_pb(&none, "n");
        assert_eq!(read_value_pb(&bytes, &opt_kind, DType::I64).unwrap(), none);

        let t = Value::Tensor(Tensor::vector(vec![1.5f32]));
        let bytes = write_value_pb(&t, "t");
        assert_eq!(
            read_value_pb(&bytes, &ValueKind::Tensor, DType::F32).unwrap(),
            t
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(read_value_pb(b"\xff\xff\xff", &seq_kind(), DType::F32).is_err());
        let kind = ValueKind::Optional(Box::new(ValueKind::Tensor));
        assert!(read_value_pb(b"\x08", &kind, DType::F32).is_err());
        // An optional that says "tensor" but holds none.
        let p = OptionalProto {
            elem_type: Some(TENSOR),
            ..Default::default()
        };
        let e = read_value_pb(&p.encode_to_vec(), &kind, DType::F32).unwrap_err();
        assert!(e.to_string().contains("holds none"), "{e}");
    }
}
