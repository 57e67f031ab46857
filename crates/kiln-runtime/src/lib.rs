//! kiln's runtime: compiles a [`Graph`] into a [`plan::Plan`] (execution order,
//! value slots, liveness) and runs it. [`Session`] is the public API.

mod control_flow;
mod large_alloc;
mod load_alloc;
mod plan;
mod pool;
mod seq;
mod session;
mod value;
mod value_pb;

pub use large_alloc::LargeAligned;
pub use pool::{default_threads, install_warm, rewarm};
pub use session::{IoInfo, NodeTiming, Session, SessionOptions};
pub use value::Value;
pub use value_pb::{read_value_pb, write_value_pb};

use kiln_onnx::OnnxError;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] OnnxError),
    /// The graph is malformed (cycle, undefined value, type clash).
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// The caller's inputs do not match what the model expects.
    #[error("bad input: {0}")]
    Input(String),
    /// A node failed at run time (bad data such as an out-of-range index).
    #[error("node '{node}' ({op}): {message}")]
    Node {
        node: String,
        op: String,
        message: String,
    },
    /// The system refused a resource (threads).
    #[error("{0}")]
    Resource(String),
    /// The model needs a dtype, mode or feature kiln does not implement.
    #[error("unsupported: {message} at node {node} ({op})")]
    Unsupported {
        node: String,
        op: String,
        message: String,
    },
}

impl Error {
    /// Whether the failure is "kiln does not support this yet" (CLI exit code 3)
    /// rather than a bad model or bad input.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            Error::Unsupported { .. }
                | Error::Load(OnnxError::UnsupportedOp { .. })
                | Error::Load(OnnxError::UnsupportedFeature(_))
        )
    }
}

pub type Result<T> = std::result::Result<T, Error>;
