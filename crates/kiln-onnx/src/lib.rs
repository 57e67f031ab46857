//! ONNX frontend: reads a ModelProto (from a file or bytes), resolves opset
//! differences and external data, and produces a kiln [`Graph`]. Nothing after
//! this crate knows about protobufs or opset versions.

mod attrs;
mod convert;
mod convert_attn;
mod convert_index;
mod convert_quant;
mod convert_seq;
mod convert_text;
mod convert_vision;
#[allow(clippy::all, missing_docs)]
pub mod proto;
mod stream;
mod tensor_proto;
#[cfg(test)]
mod test_util;

pub use tensor_proto::{
    dtype_from_onnx, dtype_to_onnx, read_tensor_pb, tensor_from_proto, tensor_to_proto,
    write_tensor_pb, TensorLimits,
};

use kiln_ir::Graph;
use prost::Message;
use std::path::Path;

/// The newest default-domain opset kiln knows (the `onnx` 1.23 package defines 25..28
/// depending on the operator; models importing newer opsets are refused).
pub const MAX_OPSET: i64 = 28;
/// The oldest default-domain opset kiln accepts. Pre-7 forms (opt-in broadcasting,
/// attribute-form parameters) are normalized or refused per op by the converter.
pub const MIN_OPSET: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a valid ONNX model: {0}")]
    Decode(String),
    #[error("invalid model: {0}")]
    Invalid(String),
    /// A serialized TensorProto (an input or output `.pb` file) that does not decode.
    #[error("not a valid ONNX TensorProto: {0}")]
    TensorDecode(String),
    /// An operator kiln does not implement (message format is part of the CLI contract).
    #[error("unsupported: {op} (opset {opset}) at node {node}")]
    UnsupportedOp {
        op: String,
        opset: i64,
        node: String,
    },
    /// A dtype, attribute value or model feature kiln does not implement.
    #[error("unsupported: {0}")]
    UnsupportedFeature(String),
}

pub type Result<T> = std::result::Result<T, OnnxError>;

/// Loader limits.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Largest single tensor (initializer or constant) accepted, in bytes.
    pub max_tensor_bytes: usize,
    /// Most nodes accepted in the main graph (a guard against hostile files).
    pub max_nodes: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_tensor_bytes: 16 << 30,
            max_nodes: 1_000_000,
        }
    }
}

/// A loaded model: the graph plus the metadata `kiln inspect` shows.
#[derive(Clone, Debug)]
pub struct Model {
    pub graph: Graph,
    pub ir_version: i64,
    /// Version of the default (`ai.onnx`) opset.
    pub opset: i64,
    /// Every imported opset: (domain, version).
    pub opset_imports: Vec<(String, i64)>,
    pub producer: String,
}

/// Loads a model file. External data paths are resolved in the file's folder.
pub fn load_model(path: &Path, options: &LoadOptions) -> Result<Model> {
    let io = |e: std::io::Error| OnnxError::Io {
        path: path.display().to_string(),
        source: e,
    };
    let dir = path.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    });
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len >= STREAM_MIN_BYTES {
        return load_streaming(&mut file, len, dir, options);
    }
    let proto = {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes).map_err(io)?;
        decode(&bytes)?
        // The file's bytes are freed here, before the weights are converted.
    };
    model_from_proto(proto, dir, options, &mut std::iter::empty())
}

/// Files at least this big stream their weights (see `stream.rs`): the
/// file's bytes and the decoded weights are never all in memory at once.
const STREAM_MIN_BYTES: u64 = 16 << 20;

/// Loads a model by decoding its skeleton, then reading, decoding and
/// converting one initializer at a time.
fn load_streaming(
    file: &mut std::fs::File,
    len: u64,
    dir: Option<&Path>,
    options: &LoadOptions,
) -> Result<Model> {
    let split = stream::split_model(&mut *file, len)?;
    let proto = decode(&split.skeleton)?;
    let max_bytes = options.max_tensor_bytes;
    let mut inits = split
        .initializers
        .into_iter()
        .enumerate()
        .map(move |(i, (offset, n))| {
            // A TensorProto is its data plus a little framing: refuse absurd
            // lengths before allocating for them.
            if n > max_bytes.saturating_add(1 << 20) {
                return Err(OnnxError::Invalid(format!(
                    "initializer #{i} (at byte {offset}) is {n} bytes, over the limit of {max_bytes}"
                )));
            }
            let buf = stream::read_at(&mut *file, offset, n)?;
            proto::TensorProto::decode(buf.as_slice()).map_err(|e| {
                OnnxError::Decode(format!("initializer #{i} (at byte {offset}): {e}"))
            })
        });
    model_from_proto(proto, dir, options, &mut inits)
}

fn decode(bytes: &[u8]) -> Result<proto::ModelProto> {
    proto::ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))
}

/// Loads a model from bytes. `base_dir` is where external data files live; with
/// `None`, a model with external data is refused.
pub fn load_model_bytes(
    bytes: &[u8],
    base_dir: Option<&Path>,
    options: &LoadOptions,
) -> Result<Model> {
    model_from_proto(decode(bytes)?, base_dir, options, &mut std::iter::empty())
}

/// Converts a decoded model, consuming it so each weight's proto is freed
/// once converted.
fn model_from_proto(
    mut proto: proto::ModelProto,
    base_dir: Option<&Path>,
    options: &LoadOptions,
    more_initializers: &mut dyn Iterator<Item = Result<proto::TensorProto>>,
) -> Result<Model> {
    let graph_proto = proto
        .graph
        .take()
        .ok_or_else(|| OnnxError::Decode("the file has no graph (is it an ONNX model?)".into()))?;
    let mut opset = None;
    let mut opset_imports = Vec::new();
    for o in &proto.opset_import {
        let domain = o.domain.clone().unwrap_or_default();
        let version = o.version.unwrap_or(0);
        if domain.is_empty() || domain == "ai.onnx" {
            opset = Some(version);
        }
        opset_imports.push((domain, version));
    }
    let opset = opset.ok_or_else(|| {
        if opset_imports.is_empty() {
            OnnxError::Invalid("the model imports no opset".into())
        } else {
            OnnxError::UnsupportedFeature(format!(
                "models without the default ai.onnx opset (imports: {opset_imports:?})"
            ))
        }
    })?;
    if opset < MIN_OPSET {
        return Err(OnnxError::UnsupportedFeature(format!(
            "opset {opset} (kiln supports {MIN_OPSET}..={MAX_OPSET})"
        )));
    }
    if opset > MAX_OPSET {
        return Err(OnnxError::UnsupportedFeature(format!(
            "opset {opset} is newer than kiln knows (up to {MAX_OPSET})"
        )));
    }
    if !proto.functions.is_empty() {
        // Model-local functions are only needed if a node calls one; nodes in
        // unknown domains are reported as unsupported ops by the converter.
        tracing::debug!("model has {} local functions", proto.functions.len());
    }
    if graph_proto.node.len() > options.max_nodes {
        return Err(OnnxError::Invalid(format!(
            "the graph has {} nodes, over the limit of {}",
            graph_proto.node.len(),
            options.max_nodes
        )));
    }
    let limits = TensorLimits {
        base_dir: base_dir.map(|p| p.to_path_buf()),
        max_tensor_bytes: options.max_tensor_bytes,
    };
    let mut conv = convert::Converter::new(opset, limits);
    let graph = conv.graph_owned(graph_proto, true, more_initializers)?;
    Ok(Model {
        graph,
        ir_version: proto.ir_version.unwrap_or(0),
        opset,
        opset_imports,
        producer: format!(
            "{} {}",
            proto.producer_name.unwrap_or_default(),
            proto.producer_version.unwrap_or_default()
        )
        .trim()
        .to_string(),
    })
}
