//! Loading a big model file without holding its weights twice.
//!
//! Decoding a whole `ModelProto` needs the file's bytes and the decoded
//! message (which copies every `raw_data`) in memory at once: twice the
//! weights before a single tensor is converted. Instead, [`split_model`] walks
//! the file's protobuf framing and returns a *skeleton* (the model's bytes
//! without the main graph's `initializer` fields, which is small) plus where
//! each initializer lies in the file. The caller decodes the skeleton, then
//! reads, decodes and converts one initializer at a time.
//!
//! Field numbers are ONNX's: `ModelProto.graph = 7`,
//! `GraphProto.initializer = 5`.

use crate::{OnnxError, Result};
use std::io::{BufReader, Read, Seek, SeekFrom};

const MODEL_GRAPH: u64 = 7;
const GRAPH_INITIALIZER: u64 = 5;

/// A model file split for streaming.
pub(crate) struct Split {
    /// The ModelProto without the main graph's initializers.
    pub skeleton: Vec<u8>,
    /// (byte offset, length) of each main-graph initializer's TensorProto.
    pub initializers: Vec<(u64, usize)>,
}

/// Reads protobuf framing from a file, tracking the position.
struct Walker<R> {
    r: BufReader<R>,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Walker<R> {
    fn byte(&mut self) -> Result<u8> {
        let mut b = [0u8; 1];
        self.r
            .read_exact(&mut b)
            .map_err(|e| truncated(self.pos, e))?;
        self.pos += 1;
        Ok(b[0])
    }

    /// A varint; its raw bytes are appended to `raw`.
    fn varint(&mut self, raw: &mut Vec<u8>) -> Result<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.byte()?;
            raw.push(b);
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(OnnxError::Decode(format!(
            "varint longer than 10 bytes at byte {}",
            self.pos
        )))
    }

    /// Copies `n` bytes to `out`.
    fn copy(&mut self, n: u64, out: &mut Vec<u8>) -> Result<()> {
        self.check_len(n)?;
        let start = out.len();
        out.resize(start + n as usize, 0);
        self.r
            .read_exact(&mut out[start..])
            .map_err(|e| truncated(self.pos, e))?;
        self.pos += n;
        Ok(())
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        self.check_len(n)?;
        let n = i64::try_from(n).map_err(|_| OnnxError::Decode("field too long".into()))?;
        self.r
            .seek_relative(n)
            .map_err(|e| truncated(self.pos, e))?;
        self.pos += n as u64;
        Ok(())
    }

    fn check_len(&self, n: u64) -> Result<()> {
        if self.pos.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(OnnxError::Decode(format!(
                "a field of {n} bytes at byte {} runs past the end of the file ({} bytes)",
                self.pos, self.len
            )));
        }
        Ok(())
    }

    /// Walks the message in `[self.pos, end)`, copying every field to `out`.
    /// For each length-delimited field, `on_field(walker, field, length, raw
    /// key and length bytes, out)` is asked first: when it returns true it
    /// has consumed the payload itself (and written what it wanted to `out`).
    fn message(
        &mut self,
        end: u64,
        out: &mut Vec<u8>,
        on_field: &mut dyn FnMut(&mut Self, u64, u64, &mut Vec<u8>, &mut Vec<u8>) -> Result<bool>,
    ) -> Result<()> {
        while self.pos < end {
            let mut raw = Vec::with_capacity(12);
            let key = self.varint(&mut raw)?;
            let (field, wire) = (key >> 3, key & 7);
            match wire {
                0 => {
                    self.varint(&mut raw)?;
                    out.extend_from_slice(&raw);
                }
                1 => {
                    out.extend_from_slice(&raw);
                    self.copy(8, out)?;
                }
                5 => {
                    out.extend_from_slice(&raw);
                    self.copy(4, out)?;
                }
                2 => {
                    let n = self.varint(&mut raw)?;
                    if !on_field(self, field, n, &mut raw, out)? {
                        out.extend_from_slice(&raw);
                        self.copy(n, out)?;
                    }
                }
                w => {
                    return Err(OnnxError::Decode(format!(
                        "unsupported protobuf wire type {w} (field {field}) at byte {}",
                        self.pos
                    )))
                }
            }
        }
        if self.pos != end {
            return Err(OnnxError::Decode(format!(
                "a message's fields overrun its length (at byte {}, expected {end})",
                self.pos
            )));
        }
        Ok(())
    }
}

fn truncated(pos: u64, e: std::io::Error) -> OnnxError {
    OnnxError::Decode(format!("the file ends early (at byte {pos}): {e}"))
}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Splits the ModelProto in `file` (of `len` bytes).
pub(crate) fn split_model<R: Read + Seek>(file: R, len: u64) -> Result<Split> {
    let mut w = Walker {
        r: BufReader::with_capacity(1 << 16, file),
        pos: 0,
        len,
    };
    let mut skeleton = Vec::new();
    let mut initializers = Vec::new();
    w.message(len, &mut skeleton, &mut |w, field, n, _raw, out| {
        if field != MODEL_GRAPH {
            return Ok(false);
        }
        // The graph without its initializers, re-framed with its new length.
        let end = w.pos + n;
        w.check_len(n)?;
        let mut graph = Vec::new();
        w.message(end, &mut graph, &mut |w, field, n, _raw, _out| {
            if field != GRAPH_INITIALIZER {
                return Ok(false);
            }
            let n_usize =
                usize::try_from(n).map_err(|_| OnnxError::Decode("initializer too long".into()))?;
            initializers.push((w.pos, n_usize));
            w.skip(n)?;
            Ok(true)
        })?;
        put_varint(MODEL_GRAPH << 3 | 2, out);
        put_varint(graph.len() as u64, out);
        out.extend_from_slice(&graph);
        Ok(true)
    })?;
    Ok(Split {
        skeleton,
        initializers,
    })
}

/// Reads `len` bytes at `offset`.
pub(crate) fn read_at<R: Read + Seek>(file: &mut R, offset: u64, len: usize) -> Result<Vec<u8>> {
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| truncated(offset, e))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf)
        .map_err(|e| truncated(offset, e))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    };
    use crate::test_util::value;
    use crate::{load_model_bytes, tensor_to_proto, LoadOptions};
    use kiln_ir::Tensor;
    use prost::Message;
    use std::io::Cursor;

    /// A model whose graph interleaves initializers with other fields, has
    /// metadata after the graph, and a Constant node (a tensor inside a node,
    /// which stays in the skeleton).
    fn model_bytes() -> Vec<u8> {
        let w = Tensor::from_vec(vec![3, 4], (0..12).map(|i| i as f32).collect()).unwrap();
        let b = Tensor::from_vec(vec![4], vec![1.5f32, -2.0, 0.0, 7.0]).unwrap();
        let big = Tensor::from_vec(vec![300], (0..300).map(|i| i as f32 * 0.5).collect()).unwrap();
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            producer_name: Some("stream-test".into()),
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: vec![
                    NodeProto {
                        op_type: Some("MatMul".into()),
                        input: vec!["x".into(), "w".into()],
                        output: vec!["m".into()],
                        ..Default::default()
                    },
                    NodeProto {
                        op_type: Some("Add".into()),
                        input: vec!["m".into(), "b".into()],
                        output: vec!["y".into()],
                        ..Default::default()
                    },
                ],
                initializer: vec![
                    tensor_to_proto(&w, "w"),
                    tensor_to_proto(&b, "b"),
                    tensor_to_proto(&big, "unused"),
                ],
                input: vec![value("x")],
                output: vec![value("y")],
                ..Default::default()
            }),
            metadata_props: vec![StringStringEntryProto {
                key: Some("k".into()),
                value: Some("v".into()),
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn split_model_loads_the_same_graph_as_decoding_it_whole() {
        let bytes = model_bytes();
        let split = split_model(Cursor::new(&bytes), bytes.len() as u64).unwrap();
        assert_eq!(split.initializers.len(), 3);
        assert!(
            split.skeleton.len() < bytes.len() - 1200,
            "the big tensor is not in the skeleton"
        );
        let skeleton = ModelProto::decode(split.skeleton.as_slice()).unwrap();
        assert!(skeleton.graph.as_ref().unwrap().initializer.is_empty());
        assert_eq!(skeleton.metadata_props.len(), 1);
        assert_eq!(skeleton.graph.as_ref().unwrap().node.len(), 2);
        // Each recorded range decodes to its TensorProto.
        let mut cur = Cursor::new(&bytes);
        let names: Vec<String> = split
            .initializers
            .iter()
            .map(|&(o, n)| {
                let t =
                    crate::proto::TensorProto::decode(read_at(&mut cur, o, n).unwrap().as_slice())
                        .unwrap();
                t.name.unwrap()
            })
            .collect();
        assert_eq!(names, ["w", "b", "unused"]);

        // Through the public loader (streamed because it is a file) and from
        // bytes (decoded whole): the same model.
        let dir = std::env::temp_dir().join(format!("kiln-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.onnx");
        std::fs::write(&path, &bytes).unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        let streamed = crate::load_streaming(
            &mut file,
            bytes.len() as u64,
            Some(&dir),
            &LoadOptions::default(),
        )
        .unwrap();
        let whole = load_model_bytes(&bytes, Some(&dir), &LoadOptions::default()).unwrap();
        assert_eq!(streamed.graph, whole.graph);
        assert_eq!(streamed.opset, 17);
        assert_eq!(streamed.producer, whole.producer);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_or_garbled_files_are_errors() {
        let bytes = model_bytes();
        for cut in [1, 7, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
            let part = &bytes[..cut];
            let r = split_model(Cursor::new(part), part.len() as u64).and_then(|s| {
                ModelProto::decode(s.skeleton.as_slice())
                    .map(|_| ())
                    .map_err(|e| OnnxError::Decode(e.to_string()))
            });
            assert!(r.is_err(), "cut at {cut} of {}", bytes.len());
        }
        // An invalid wire type.
        let bad = [0x0f_u8, 0x00];
        let e = split_model(Cursor::new(&bad[..]), 2)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("wire type"), "{e}");
        // A length past the end of the file.
        let bad = [0x3a_u8, 0xff, 0xff, 0x03];
        let e = split_model(Cursor::new(&bad[..]), 4)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("past the end"), "{e}");
    }
}
