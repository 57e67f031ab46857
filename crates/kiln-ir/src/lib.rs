//! kiln's intermediate representation: element types, tensors, symbolic shapes,
//! the typed operator set and graphs. Every later stage (optimizer, backends,
//! runtime) works on these types; nothing here knows about ONNX protobufs or
//! about hardware.

mod dtype;
mod graph;
pub mod infer;
mod op;
mod op_attn;
mod op_fused;
mod op_index;
mod op_quant;
mod op_seq;
mod op_text;
mod op_vision;
mod shape;
mod tensor;

pub use dtype::DType;
pub use graph::{Graph, Node, ValueInfo};
pub use op::*;
pub use op_attn::AttnOp;
pub use op_fused::{AttnLayout, AttnMask, AttnScale, FusedAct, FusedOp};
pub use op_index::IndexOp;
pub use op_quant::QuantOp;
pub use op_seq::{ScanAttrs, SeqOp};
pub use op_text::TextOp;
pub use op_vision::VisionOp;
pub use shape::{
    broadcast_shapes, format_shape, known_shape, Dim, DimExpr, Shape, ValueKind, ValueType,
};
pub use tensor::{checked_numel, Element, Tensor, TensorData};

/// Errors about the IR itself: malformed graphs, tensors that do not fit their
/// shape, type clashes found by inference.
#[derive(Debug, thiserror::Error)]
pub enum IrError {
    #[error("{0}")]
    Invalid(String),
}
