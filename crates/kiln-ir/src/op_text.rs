//! Typed string and image-decoding ops (StringNormalizer, StringSplit, StringConcat, RegexFullMatch, TfIdfVectorizer, ImageDecoder).
//!
//! Each family of ops keeps its enum, its ONNX names and its shape/type rule
//! here; the frontend parses it in `kiln-onnx/src/convert_text.rs` and the kernels
//! live in `kiln-cpu/src/text.rs`.

use crate::{Tensor, ValueType};

/// string and image-decoding ops (StringNormalizer, StringSplit, StringConcat, RegexFullMatch, TfIdfVectorizer, ImageDecoder).
#[derive(Clone, Debug, PartialEq)]
pub enum TextOp {}

impl TextOp {
    /// The ONNX operator name.
    pub fn name(&self) -> &'static str {
        match *self {}
    }

    /// Output types from input types (`None`: absent or unknown) and the values of
    /// constant inputs. Returns one entry per node output (`None`: unknown), or a
    /// message saying what is wrong with the inputs.
    pub fn infer(
        &self,
        _types: &[Option<ValueType>],
        _consts: &[Option<&Tensor>],
        _num_outputs: usize,
    ) -> Result<Vec<Option<ValueType>>, String> {
        match *self {}
    }
}
