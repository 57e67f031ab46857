//! Run-time values: tensors (the common case), sequences of tensors, optionals.
//!
//! [`Value`] is the public form (owned tensors). Inside a run, slots hold
//! [`Val`], whose tensors are shared (`Arc`), so passing a value on, putting a
//! tensor into a sequence or taking it out never copies its data.

use kiln_ir::{DType, Tensor};
use std::sync::Arc;

/// A model input or output value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Tensor(Tensor),
    /// A sequence of tensors of one element type (`dtype`, known even when empty).
    Sequence {
        dtype: DType,
        tensors: Vec<Tensor>,
    },
    /// A value, or none.
    Optional(Option<Box<Value>>),
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Value {
        Value::Tensor(t)
    }
}

impl Value {
    /// A sequence of `tensors`, all of type `dtype`; `None` when one is not.
    pub fn sequence(dtype: DType, tensors: Vec<Tensor>) -> Option<Value> {
        tensors
            .iter()
            .all(|t| t.dtype() == dtype)
            .then_some(Value::Sequence { dtype, tensors })
    }

    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// The tensor, or the value itself when it is not one.
    pub fn into_tensor(self) -> Result<Tensor, Value> {
        match self {
            Value::Tensor(t) => Ok(t),
            other => Err(other),
        }
    }

    /// "tensor", "sequence" or "optional".
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Tensor(_) => "tensor",
            Value::Sequence { .. } => "sequence",
            Value::Optional(_) => "optional",
        }
    }

    /// A short description for messages: `f32 tensor [2, 3]`,
    /// `sequence of 2 f32 tensors`, `empty optional`.
    pub fn describe(&self) -> String {
        match self {
            Value::Tensor(t) => format!("{} tensor {:?}", t.dtype(), t.shape()),
            Value::Sequence { dtype, tensors } => {
                format!("sequence of {} {dtype} tensors", tensors.len())
            }
            Value::Optional(None) => "empty optional".into(),
            Value::Optional(Some(v)) => format!("optional holding a {}", v.describe()),
        }
    }
}

/// A value inside a run: tensors are shared.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    Tensor(Arc<Tensor>),
    Sequence(Arc<SeqVal>),
    Optional(Option<Box<Val>>),
}

/// The content of a sequence value.
#[derive(Clone, Debug)]
pub(crate) struct SeqVal {
    pub dtype: DType,
    pub items: Vec<Arc<Tensor>>,
}

impl Val {
    pub fn tensor(t: Tensor) -> Val {
        Val::Tensor(Arc::new(t))
    }

    pub fn sequence(dtype: DType, items: Vec<Arc<Tensor>>) -> Val {
        Val::Sequence(Arc::new(SeqVal { dtype, items }))
    }

    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Val::Tensor(t) => Some(t),
            _ => None,
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            Val::Tensor(_) => "tensor",
            Val::Sequence(_) => "sequence",
            Val::Optional(_) => "optional",
        }
    }

    pub fn from_value(v: Value) -> Val {
        match v {
            Value::Tensor(t) => Val::tensor(t),
            Value::Sequence { dtype, tensors } => {
                Val::sequence(dtype, tensors.into_iter().map(Arc::new).collect())
            }
            Value::Optional(v) => Val::Optional(v.map(|v| Box::new(Val::from_value(*v)))),
        }
    }

    /// The owned form; tensors still shared elsewhere are copied.
    pub fn into_value(self) -> Value {
        match self {
            Val::Tensor(t) => Value::Tensor(unwrap_arc(t)),
            Val::Sequence(s) => {
                let s = Arc::try_unwrap(s).unwrap_or_else(|a| (*a).clone());
                Value::Sequence {
                    dtype: s.dtype,
                    tensors: s.items.into_iter().map(unwrap_arc).collect(),
                }
            }
            Val::Optional(v) => Value::Optional(v.map(|v| Box::new(v.into_value()))),
        }
    }
}

pub(crate) fn unwrap_arc(t: Arc<Tensor>) -> Tensor {
    Arc::try_unwrap(t).unwrap_or_else(|a| (*a).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_describes() {
        let v = Value::Optional(Some(Box::new(
            Value::sequence(DType::F32, vec![Tensor::vector(vec![1.0f32, 2.0])]).unwrap(),
        )));
        assert_eq!(v.describe(), "optional holding a sequence of 1 f32 tensors");
        let back = Val::from_value(v.clone()).into_value();
        assert_eq!(back, v);
        assert!(Value::sequence(DType::I64, vec![Tensor::scalar(1.0f32)]).is_none());
        let empty = Value::sequence(DType::I64, vec![]).unwrap();
        assert_eq!(empty.describe(), "sequence of 0 i64 tensors");
        assert_eq!(Value::Optional(None).kind_name(), "optional");
        assert!(Value::from(Tensor::scalar(1i64)).into_tensor().is_ok());
    }
}
