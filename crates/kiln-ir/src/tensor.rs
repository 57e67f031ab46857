//! Dense tensors: a shape plus one typed, contiguous, row-major buffer.

use crate::{DType, IrError};
use half::{bf16, f16};
use std::fmt;

/// The typed element buffer of a tensor.
#[derive(Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    /// A low-precision type (`DType::is_bits`): one byte per element holding its
    /// bit pattern (4- and 2-bit values in the low bits, the high bits zero).
    Bits(DType, Vec<u8>),
}

/// Runs `$body` with `$v` bound to the inner `Vec` of any [`TensorData`] variant.
#[macro_export]
macro_rules! with_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::TensorData::F32($v) => $body,
            $crate::TensorData::F64($v) => $body,
            $crate::TensorData::F16($v) => $body,
            $crate::TensorData::BF16($v) => $body,
            $crate::TensorData::I8($v) => $body,
            $crate::TensorData::I16($v) => $body,
            $crate::TensorData::I32($v) => $body,
            $crate::TensorData::I64($v) => $body,
            $crate::TensorData::U8($v) => $body,
            $crate::TensorData::U16($v) => $body,
            $crate::TensorData::U32($v) => $body,
            $crate::TensorData::U64($v) => $body,
            $crate::TensorData::Bool($v) => $body,
            $crate::TensorData::String($v) => $body,
            $crate::TensorData::Bits(_, $v) => $body,
        }
    };
}

/// Like [`with_data!`], but the body produces a `Vec` of the same element type,
/// which is wrapped back into the same variant.
#[macro_export]
macro_rules! map_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::TensorData::F32($v) => $crate::TensorData::F32($body),
            $crate::TensorData::F64($v) => $crate::TensorData::F64($body),
            $crate::TensorData::F16($v) => $crate::TensorData::F16($body),
            $crate::TensorData::BF16($v) => $crate::TensorData::BF16($body),
            $crate::TensorData::I8($v) => $crate::TensorData::I8($body),
            $crate::TensorData::I16($v) => $crate::TensorData::I16($body),
            $crate::TensorData::I32($v) => $crate::TensorData::I32($body),
            $crate::TensorData::I64($v) => $crate::TensorData::I64($body),
            $crate::TensorData::U8($v) => $crate::TensorData::U8($body),
            $crate::TensorData::U16($v) => $crate::TensorData::U16($body),
            $crate::TensorData::U32($v) => $crate::TensorData::U32($body),
            $crate::TensorData::U64($v) => $crate::TensorData::U64($body),
            $crate::TensorData::Bool($v) => $crate::TensorData::Bool($body),
            $crate::TensorData::String($v) => $crate::TensorData::String($body),
            $crate::TensorData::Bits(__kiln_dt, $v) => {
                let __kiln_dt = $crate::TensorData::bits_dtype(__kiln_dt);
                $crate::TensorData::Bits(__kiln_dt, $body)
            }
        }
    };
}

impl TensorData {
    /// The dtype a `Bits` variant carries, whether the match bound it by value
    /// or by reference (used by [`map_data!`]).
    #[doc(hidden)]
    pub fn bits_dtype(d: impl std::borrow::Borrow<DType>) -> DType {
        *d.borrow()
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F64(_) => DType::F64,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::I8(_) => DType::I8,
            TensorData::I16(_) => DType::I16,
            TensorData::I32(_) => DType::I32,
            TensorData::I64(_) => DType::I64,
            TensorData::U8(_) => DType::U8,
            TensorData::U16(_) => DType::U16,
            TensorData::U32(_) => DType::U32,
            TensorData::U64(_) => DType::U64,
            TensorData::Bool(_) => DType::Bool,
            TensorData::String(_) => DType::String,
            TensorData::Bits(d, _) => *d,
        }
    }

    pub fn len(&self) -> usize {
        with_data!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A buffer of `len` default elements (zero, false, "").
    pub fn zeros(dtype: DType, len: usize) -> TensorData {
        match dtype {
            DType::F32 => TensorData::F32(vec![0.0; len]),
            DType::F64 => TensorData::F64(vec![0.0; len]),
            DType::F16 => TensorData::F16(vec![f16::ZERO; len]),
            DType::BF16 => TensorData::BF16(vec![bf16::ZERO; len]),
            DType::I8 => TensorData::I8(vec![0; len]),
            DType::I16 => TensorData::I16(vec![0; len]),
            DType::I32 => TensorData::I32(vec![0; len]),
            DType::I64 => TensorData::I64(vec![0; len]),
            DType::U8 => TensorData::U8(vec![0; len]),
            DType::U16 => TensorData::U16(vec![0; len]),
            DType::U32 => TensorData::U32(vec![0; len]),
            DType::U64 => TensorData::U64(vec![0; len]),
            DType::Bool => TensorData::Bool(vec![false; len]),
            DType::String => TensorData::String(vec![String::new(); len]),
            // Zero is the all-zero bit pattern in every low-precision type
            // (e8m0 has no zero: its pattern 0 is 2^-127, its smallest value).
            d => TensorData::Bits(d, vec![0; len]),
        }
    }

    /// New buffer holding the elements at `indices` (in that order).
    pub fn gather(&self, indices: impl Iterator<Item = usize>) -> TensorData {
        map_data!(self, v => indices.map(|i| v[i].clone()).collect())
    }
}

/// A Rust type that can be the element of a [`Tensor`].
pub trait Element: Clone + Send + Sync + 'static {
    const DTYPE: DType;
    fn slice(data: &TensorData) -> Option<&[Self]>;
    fn slice_mut(data: &mut TensorData) -> Option<&mut [Self]>;
    fn into_vec(data: TensorData) -> Option<Vec<Self>>;
    fn wrap(v: Vec<Self>) -> TensorData;
}

macro_rules! impl_element {
    ($t:ty, $variant:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn slice(data: &TensorData) -> Option<&[Self]> {
                match data {
                    TensorData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(data: &mut TensorData) -> Option<&mut [Self]> {
                match data {
                    TensorData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn into_vec(data: TensorData) -> Option<Vec<Self>> {
                match data {
                    TensorData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<Self>) -> TensorData {
                TensorData::$variant(v)
            }
        }
    };
}

impl_element!(f32, F32);
impl_element!(f64, F64);
impl_element!(f16, F16);
impl_element!(bf16, BF16);
impl_element!(i8, I8);
impl_element!(i16, I16);
impl_element!(i32, I32);
impl_element!(i64, I64);
// u8 also views the bytes of `Bits` tensors, so that kernels generic over the
// element type (through `map_data!`, which keeps the dtype) can read them as
// slices; `into_vec` and `wrap` stay with the U8 variant.
impl Element for u8 {
    const DTYPE: DType = DType::U8;
    fn slice(data: &TensorData) -> Option<&[Self]> {
        match data {
            TensorData::U8(v) | TensorData::Bits(_, v) => Some(v),
            _ => None,
        }
    }
    fn slice_mut(data: &mut TensorData) -> Option<&mut [Self]> {
        match data {
            TensorData::U8(v) | TensorData::Bits(_, v) => Some(v),
            _ => None,
        }
    }
    fn into_vec(data: TensorData) -> Option<Vec<Self>> {
        match data {
            TensorData::U8(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> TensorData {
        TensorData::U8(v)
    }
}
impl_element!(u16, U16);
impl_element!(u32, U32);
impl_element!(u64, U64);
impl_element!(bool, Bool);
impl_element!(String, String);

/// A dense, row-major tensor with a concrete shape.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

/// Number of elements of `shape`, or `None` when the product overflows.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    /// Builds a tensor, checking that the buffer length matches the shape.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Tensor, IrError> {
        let numel = checked_numel(&shape)
            .ok_or_else(|| IrError::Invalid(format!("shape {shape:?} overflows")))?;
        if numel != data.len() {
            return Err(IrError::Invalid(format!(
                "shape {:?} needs {} elements but the buffer holds {}",
                shape,
                numel,
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    pub fn from_vec<T: Element>(shape: Vec<usize>, v: Vec<T>) -> Result<Tensor, IrError> {
        Tensor::new(shape, T::wrap(v))
    }

    pub fn scalar<T: Element>(v: T) -> Tensor {
        Tensor {
            shape: vec![],
            data: T::wrap(vec![v]),
        }
    }

    /// A 1-D tensor.
    pub fn vector<T: Element>(v: Vec<T>) -> Tensor {
        Tensor {
            shape: vec![v.len()],
            data: T::wrap(v),
        }
    }

    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Result<Tensor, IrError> {
        let numel = checked_numel(&shape)
            .ok_or_else(|| IrError::Invalid(format!("shape {shape:?} overflows")))?;
        Ok(Tensor {
            shape,
            data: TensorData::zeros(dtype, numel),
        })
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut TensorData {
        &mut self.data
    }

    pub fn into_data(self) -> TensorData {
        self.data
    }

    pub fn into_parts(self) -> (Vec<usize>, TensorData) {
        (self.shape, self.data)
    }

    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        T::slice(&self.data)
    }

    pub fn as_slice_mut<T: Element>(&mut self) -> Option<&mut [T]> {
        T::slice_mut(&mut self.data)
    }

    /// Same data, new shape (element count must match).
    pub fn reshaped(self, shape: Vec<usize>) -> Result<Tensor, IrError> {
        Tensor::new(shape, self.data)
    }

    /// Size in bytes of the element buffer (strings count their bytes).
    pub fn byte_size(&self) -> usize {
        match &self.data {
            TensorData::String(v) => v.iter().map(|s| s.len()).sum(),
            d => d.len() * d.dtype().size(),
        }
    }

    /// Elements converted to i64 (integer and bool tensors; floats are truncated).
    /// Used for shape-like inputs: shapes, axes, indices, pads.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, IrError> {
        Ok(match &self.data {
            TensorData::I64(v) => v.clone(),
            TensorData::I32(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::I16(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::I8(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::U8(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::U16(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::U32(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::U64(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::Bool(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::F32(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::F64(v) => v.iter().map(|&x| x as i64).collect(),
            TensorData::F16(v) => v.iter().map(|&x| x.to_f32() as i64).collect(),
            TensorData::BF16(v) => v.iter().map(|&x| x.to_f32() as i64).collect(),
            TensorData::String(_) => {
                return Err(IrError::Invalid(
                    "expected a numeric tensor, got strings".into(),
                ))
            }
            TensorData::Bits(d, v) => v.iter().map(|&b| d.decode_bits(b) as i64).collect(),
        })
    }

    /// Elements converted to f64 (any numeric or bool tensor).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>, IrError> {
        Ok(match &self.data {
            TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::F64(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|&x| x.to_f64()).collect(),
            TensorData::BF16(v) => v.iter().map(|&x| x.to_f64()).collect(),
            TensorData::Bits(d, v) => v.iter().map(|&b| d.decode_bits(b) as f64).collect(),
            TensorData::String(_) => {
                return Err(IrError::Invalid(
                    "expected a numeric tensor, got strings".into(),
                ))
            }
            _ => self.to_i64_vec()?.into_iter().map(|x| x as f64).collect(),
        })
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor<{}>{:?}", self.dtype(), self.shape)?;
        const SHOW: usize = 8;
        with_data!(&self.data, v => {
            let head: Vec<String> = v.iter().take(SHOW).map(|x| format!("{x:?}")).collect();
            write!(f, " [{}{}]", head.join(", "), if v.len() > SHOW { ", ..." } else { "" })
        })
    }
}
