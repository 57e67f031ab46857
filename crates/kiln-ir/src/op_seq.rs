//! Typed sequence and optional ops (Sequence*, SplitToSequence, ConcatFromSequence, Optional*, Scan); executed by the runtime.
//!
//! Each family of ops keeps its enum, its ONNX names and its shape/type rule
//! here; the frontend parses it in `kiln-onnx/src/convert_seq.rs` and the kernels
//! live in `kiln-cpu/src/seq.rs`.

use crate::{Graph, Tensor, ValueType};

/// sequence and optional ops (Sequence*, SplitToSequence, ConcatFromSequence, Optional*, Scan); executed by the runtime.
#[derive(Clone, Debug, PartialEq)]
pub enum SeqOp {}

impl SeqOp {
    /// The ONNX operator name.
    pub fn name(&self) -> &'static str {
        match *self {}
    }

    /// Subgraphs this op holds (Scan body, SequenceMap body).
    pub fn subgraphs(&self) -> Vec<&Graph> {
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
