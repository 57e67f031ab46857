//! TensorProto <-> Tensor: every storage encoding ONNX allows (raw_data, the typed
//! repeated fields, external data files), and writing tensors back out.

use crate::proto::{tensor_proto::DataLocation, TensorProto};
use crate::{OnnxError, Result};
use half::{bf16, f16};
use kiln_ir::{checked_numel, DType, Tensor, TensorData};
use std::path::{Component, Path, PathBuf};

/// Maps an ONNX `TensorProto.DataType` code to a kiln dtype.
pub fn dtype_from_onnx(code: i32) -> Result<DType> {
    Ok(match code {
        1 => DType::F32,
        2 => DType::U8,
        3 => DType::I8,
        4 => DType::U16,
        5 => DType::I16,
        6 => DType::I32,
        7 => DType::I64,
        8 => DType::String,
        9 => DType::Bool,
        10 => DType::F16,
        11 => DType::F64,
        12 => DType::U32,
        13 => DType::U64,
        16 => DType::BF16,
        17 => DType::F8E4M3FN,
        18 => DType::F8E4M3FNUZ,
        19 => DType::F8E5M2,
        20 => DType::F8E5M2FNUZ,
        21 => DType::U4,
        22 => DType::I4,
        23 => DType::F4E2M1,
        24 => DType::F8E8M0,
        25 => DType::U2,
        26 => DType::I2,
        0 => {
            return Err(OnnxError::Invalid(
                "tensor element type is UNDEFINED (0)".into(),
            ))
        }
        other => {
            let name = crate::proto::tensor_proto::DataType::try_from(other)
                .map(|d| d.as_str_name().to_string())
                .unwrap_or_else(|_| format!("code {other}"));
            return Err(OnnxError::UnsupportedFeature(format!(
                "tensor element type {name}"
            )));
        }
    })
}

/// The ONNX `TensorProto.DataType` code of a kiln dtype.
pub fn dtype_to_onnx(dtype: DType) -> i32 {
    match dtype {
        DType::F32 => 1,
        DType::U8 => 2,
        DType::I8 => 3,
        DType::U16 => 4,
        DType::I16 => 5,
        DType::I32 => 6,
        DType::I64 => 7,
        DType::String => 8,
        DType::Bool => 9,
        DType::F16 => 10,
        DType::F64 => 11,
        DType::U32 => 12,
        DType::U64 => 13,
        DType::BF16 => 16,
        DType::F8E4M3FN => 17,
        DType::F8E4M3FNUZ => 18,
        DType::F8E5M2 => 19,
        DType::F8E5M2FNUZ => 20,
        DType::U4 => 21,
        DType::I4 => 22,
        DType::F4E2M1 => 23,
        DType::F8E8M0 => 24,
        DType::U2 => 25,
        DType::I2 => 26,
    }
}

/// Bytes that `numel` elements of `dtype` take in raw_data (4- and 2-bit types
/// are packed), or `None` on overflow.
fn raw_len(dtype: DType, numel: usize) -> Option<usize> {
    match dtype.bit_width() {
        4 => Some(numel.div_ceil(2)),
        2 => Some(numel.div_ceil(4)),
        _ => numel.checked_mul(dtype.size()),
    }
}

/// Splits packed 4- or 2-bit elements (first element in the low bits) into one
/// byte per element.
fn unpack_bits(dtype: DType, packed: impl Iterator<Item = u8>, numel: usize) -> Vec<u8> {
    let width = dtype.bit_width();
    let per = 8 / width;
    let mask = ((1u16 << width) - 1) as u8;
    let mut out = Vec::with_capacity(numel);
    for b in packed {
        for k in 0..per {
            if out.len() < numel {
                out.push((b >> (k * width)) & mask);
            }
        }
    }
    out
}

/// Packs one-byte-per-element 4- or 2-bit values (first element in the low bits).
fn pack_bits(dtype: DType, v: &[u8]) -> Vec<u8> {
    let width = dtype.bit_width();
    let per = 8 / width;
    let mask = ((1u16 << width) - 1) as u8;
    v.chunks(per)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u8, |acc, (k, &x)| acc | ((x & mask) << (k * width)))
        })
        .collect()
}

/// Where to find external data files and how much a tensor may hold.
#[derive(Clone, Debug)]
pub struct TensorLimits {
    /// Folder that external data paths are resolved in (the model's folder).
    /// `None` when the model came from bytes: external data is then an error.
    pub base_dir: Option<PathBuf>,
    /// Largest tensor accepted, in bytes.
    pub max_tensor_bytes: usize,
}

/// Decodes a TensorProto into a Tensor.
pub fn tensor_from_proto(t: &TensorProto, limits: &TensorLimits) -> Result<Tensor> {
    let name = t.name.as_deref().unwrap_or("");
    let ctx = |msg: String| OnnxError::Invalid(format!("tensor '{name}': {msg}"));
    let dtype = dtype_from_onnx(t.data_type.unwrap_or(0)).map_err(|e| match e {
        OnnxError::UnsupportedFeature(m) => {
            OnnxError::UnsupportedFeature(format!("{m} (tensor '{name}')"))
        }
        other => ctx(other.to_string()),
    })?;
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(ctx(format!("negative dimension {d} in {:?}", t.dims)));
        }
        shape.push(usize::try_from(d).map_err(|_| ctx(format!("dimension {d} is too large")))?);
    }
    let numel =
        checked_numel(&shape).ok_or_else(|| ctx(format!("shape {:?} overflows", t.dims)))?;
    let bytes = numel.checked_mul(dtype.size()).unwrap_or(usize::MAX);
    if dtype != DType::String && bytes > limits.max_tensor_bytes {
        return Err(ctx(format!(
            "shape {:?} needs {} bytes, over the limit of {} bytes",
            t.dims, bytes, limits.max_tensor_bytes
        )));
    }

    let external;
    let raw: Option<&[u8]> = if t.data_location == Some(DataLocation::External as i32) {
        let expected = raw_len(dtype, numel).ok_or_else(|| ctx("tensor size overflows".into()))?;
        external = read_external(t, limits, expected).map_err(|e| match e {
            OnnxError::Invalid(m) => ctx(m),
            other => other,
        })?;
        Some(&external)
    } else {
        t.raw_data.as_deref().filter(|_| dtype != DType::String)
    };

    let data = match raw {
        Some(raw) => decode_raw(dtype, raw, numel).map_err(ctx)?,
        None => decode_typed(t, dtype, numel).map_err(ctx)?,
    };
    if data.len() != numel {
        // An empty typed field with a non-empty shape is how some exporters write
        // zeros? No: ONNX requires the data. Report the mismatch.
        return Err(ctx(format!(
            "shape {:?} needs {} elements but the data holds {}",
            t.dims,
            numel,
            data.len()
        )));
    }
    Tensor::new(shape, data).map_err(|e| ctx(e.to_string()))
}

fn decode_raw(dtype: DType, raw: &[u8], numel: usize) -> std::result::Result<TensorData, String> {
    let need = raw_len(dtype, numel).ok_or("tensor size overflows")?;
    if raw.len() != need {
        return Err(format!(
            "raw_data holds {} bytes but {} elements of {} need {}",
            raw.len(),
            numel,
            dtype,
            need
        ));
    }
    macro_rules! le {
        ($t:ty, $n:expr) => {
            raw.chunks_exact($n)
                .map(|c| {
                    let mut b = [0u8; $n];
                    b.copy_from_slice(c);
                    <$t>::from_le_bytes(b)
                })
                .collect::<Vec<$t>>()
        };
    }
    Ok(match dtype {
        DType::F32 => TensorData::F32(le!(f32, 4)),
        DType::F64 => TensorData::F64(le!(f64, 8)),
        DType::F16 => TensorData::F16(le!(u16, 2).into_iter().map(f16::from_bits).collect()),
        DType::BF16 => TensorData::BF16(le!(u16, 2).into_iter().map(bf16::from_bits).collect()),
        DType::I8 => TensorData::I8(raw.iter().map(|&b| b as i8).collect()),
        DType::I16 => TensorData::I16(le!(i16, 2)),
        DType::I32 => TensorData::I32(le!(i32, 4)),
        DType::I64 => TensorData::I64(le!(i64, 8)),
        DType::U8 => TensorData::U8(raw.to_vec()),
        DType::U16 => TensorData::U16(le!(u16, 2)),
        DType::U32 => TensorData::U32(le!(u32, 4)),
        DType::U64 => TensorData::U64(le!(u64, 8)),
        DType::Bool => TensorData::Bool(raw.iter().map(|&b| b != 0).collect()),
        DType::String => return Err("string tensors cannot use raw_data".into()),
        d if d.bit_width() < 8 => TensorData::Bits(d, unpack_bits(d, raw.iter().copied(), numel)),
        d => TensorData::Bits(d, raw.to_vec()),
    })
}

fn decode_typed(
    t: &TensorProto,
    dtype: DType,
    numel: usize,
) -> std::result::Result<TensorData, String> {
    let i32s = &t.int32_data;
    Ok(match dtype {
        DType::F32 => TensorData::F32(t.float_data.clone()),
        DType::F64 => TensorData::F64(t.double_data.clone()),
        // float16/bfloat16 are stored as their bit patterns in int32_data.
        DType::F16 => TensorData::F16(i32s.iter().map(|&v| f16::from_bits(v as u16)).collect()),
        DType::BF16 => TensorData::BF16(i32s.iter().map(|&v| bf16::from_bits(v as u16)).collect()),
        DType::I8 => TensorData::I8(i32s.iter().map(|&v| v as i8).collect()),
        DType::I16 => TensorData::I16(i32s.iter().map(|&v| v as i16).collect()),
        DType::I32 => TensorData::I32(i32s.clone()),
        DType::I64 => TensorData::I64(t.int64_data.clone()),
        DType::U8 => TensorData::U8(i32s.iter().map(|&v| v as u8).collect()),
        DType::U16 => TensorData::U16(i32s.iter().map(|&v| v as u16).collect()),
        DType::U32 => TensorData::U32(t.uint64_data.iter().map(|&v| v as u32).collect()),
        DType::U64 => TensorData::U64(t.uint64_data.clone()),
        DType::Bool => TensorData::Bool(i32s.iter().map(|&v| v != 0).collect()),
        DType::String => TensorData::String(
            t.string_data
                .iter()
                .map(|b| {
                    String::from_utf8(b.clone())
                        .map_err(|_| "a string element is not valid UTF-8".to_string())
                })
                .collect::<std::result::Result<_, _>>()?,
        ),
        // 4- and 2-bit types: each int32 holds one packed byte.
        d if d.bit_width() < 8 => {
            if i32s.len() != raw_len(d, numel).unwrap_or(usize::MAX) {
                return Err(format!(
                    "int32_data holds {} packed bytes but {} elements of {} need {}",
                    i32s.len(),
                    numel,
                    d,
                    raw_len(d, numel).unwrap_or(usize::MAX)
                ));
            }
            TensorData::Bits(d, unpack_bits(d, i32s.iter().map(|&v| v as u8), numel))
        }
        d => TensorData::Bits(d, i32s.iter().map(|&v| v as u8).collect()),
    })
}

/// Reads a tensor's bytes from its external data file. The path must be relative
/// and stay inside the model's folder once resolved (symlinks included).
fn read_external(t: &TensorProto, limits: &TensorLimits, expected: usize) -> Result<Vec<u8>> {
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for kv in &t.external_data {
        let value = kv.value.as_deref().unwrap_or("");
        match kv.key.as_deref().unwrap_or("") {
            "location" => location = Some(value.to_string()),
            "offset" => {
                offset = value.parse().map_err(|_| {
                    OnnxError::Invalid(format!("external data offset '{value}' is not a number"))
                })?
            }
            "length" => {
                length = Some(value.parse::<u64>().map_err(|_| {
                    OnnxError::Invalid(format!("external data length '{value}' is not a number"))
                })?)
            }
            _ => {}
        }
    }
    let location =
        location.ok_or_else(|| OnnxError::Invalid("external data without a location".into()))?;
    let base = limits.base_dir.as_ref().ok_or_else(|| {
        OnnxError::Invalid(format!(
            "external data '{location}' needs the model's folder, but the model was loaded from bytes"
        ))
    })?;
    let rel = Path::new(&location);
    if rel.is_absolute()
        || rel.components().any(|c| {
            matches!(
                c,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        })
    {
        return Err(OnnxError::Invalid(format!(
            "external data path '{location}' escapes the model's folder"
        )));
    }
    let path = base.join(rel);
    // Resolve symlinks too: a link inside the folder must not point outside it.
    let canon_base = base
        .canonicalize()
        .map_err(|e| OnnxError::Invalid(format!("model folder {}: {e}", base.display())))?;
    let canon = path
        .canonicalize()
        .map_err(|e| OnnxError::Invalid(format!("external data file {}: {e}", path.display())))?;
    if !canon.starts_with(&canon_base) {
        return Err(OnnxError::Invalid(format!(
            "external data path '{location}' escapes the model's folder"
        )));
    }
    let len = length.unwrap_or(expected as u64);
    if len != expected as u64 {
        return Err(OnnxError::Invalid(format!(
            "external data length {len} does not match the {expected} bytes the shape needs"
        )));
    }
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(&canon)
        .map_err(|e| OnnxError::Invalid(format!("external data file {}: {e}", canon.display())))?;
    let file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(OnnxError::Invalid(format!(
            "external data range {offset}..{} is past the end of {} ({file_len} bytes)",
            offset.saturating_add(len),
            canon.display()
        )));
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| OnnxError::Invalid(format!("external data file {}: {e}", canon.display())))?;
    let mut buf = vec![0u8; expected];
    f.read_exact(&mut buf)
        .map_err(|e| OnnxError::Invalid(format!("external data file {}: {e}", canon.display())))?;
    Ok(buf)
}

/// Encodes a tensor as a TensorProto (raw_data for numbers, string_data for strings).
pub fn tensor_to_proto(t: &Tensor, name: &str) -> TensorProto {
    let mut p = TensorProto {
        name: Some(name.to_string()),
        data_type: Some(dtype_to_onnx(t.dtype())),
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        ..Default::default()
    };
    let mut raw = Vec::with_capacity(t.byte_size());
    match t.data() {
        TensorData::F32(v) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
        TensorData::F64(v) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
        TensorData::F16(v) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&x.to_bits().to_le_bytes())),
        TensorData::BF16(v) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&x.to_bits().to_le_bytes())),
        TensorData::I8(v) => v.iter().for_each(|x| raw.push(*x as u8)),
        TensorData::I16(v) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
        TensorData::I32(v) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
        TensorData::I64(v) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
        TensorData::U8(v) => raw.extend_from_slice(v),
        TensorData::U16(v) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
        TensorData::U32(v) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
        TensorData::U64(v) => v
            .iter()
            .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
        TensorData::Bool(v) => v.iter().for_each(|x| raw.push(*x as u8)),
        TensorData::String(v) => {
            p.string_data = v.iter().map(|s| s.as_bytes().to_vec()).collect();
            return p;
        }
        TensorData::Bits(d, v) if d.bit_width() < 8 => raw = pack_bits(*d, v),
        TensorData::Bits(_, v) => raw.extend_from_slice(v),
    }
    p.raw_data = Some(raw);
    p
}

/// Reads a serialized TensorProto (a `.pb` file of the ONNX test data layout).
pub fn read_tensor_pb(bytes: &[u8]) -> Result<Tensor> {
    use prost::Message;
    let p = TensorProto::decode(bytes).map_err(|e| OnnxError::TensorDecode(e.to_string()))?;
    tensor_from_proto(
        &p,
        &TensorLimits {
            base_dir: None,
            max_tensor_bytes: usize::MAX,
        },
    )
}

/// Serializes a tensor as a TensorProto.
pub fn write_tensor_pb(t: &Tensor, name: &str) -> Vec<u8> {
    use prost::Message;
    tensor_to_proto(t, name).encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> TensorLimits {
        TensorLimits {
            base_dir: None,
            max_tensor_bytes: 1 << 20,
        }
    }

    #[test]
    fn roundtrip_every_dtype() {
        let cases = vec![
            Tensor::from_vec(vec![2], vec![1.5f32, -2.0]).unwrap(),
            Tensor::from_vec(vec![2], vec![f16::from_f32(0.5), f16::from_f32(-3.0)]).unwrap(),
            Tensor::from_vec(vec![1], vec![bf16::from_f32(2.0)]).unwrap(),
            Tensor::from_vec(vec![3], vec![i64::MIN, 0, i64::MAX]).unwrap(),
            Tensor::from_vec(vec![2], vec![true, false]).unwrap(),
            Tensor::from_vec(vec![2], vec!["a".to_string(), "βc".to_string()]).unwrap(),
            Tensor::from_vec(vec![0, 3], Vec::<u16>::new()).unwrap(),
        ];
        for t in cases {
            let back = tensor_from_proto(&tensor_to_proto(&t, "t"), &limits()).unwrap();
            assert_eq!(back, t);
        }
    }

    #[test]
    fn low_precision_types_pack_and_roundtrip() {
        // int4 [1, -1, 7]: raw 0xF1, 0x07.
        let p = TensorProto {
            data_type: Some(22),
            dims: vec![3],
            raw_data: Some(vec![0xF1, 0x07]),
            ..Default::default()
        };
        let t = tensor_from_proto(&p, &limits()).unwrap();
        assert!(t.data() == &TensorData::Bits(DType::I4, vec![1, 0xF, 7]));
        assert_eq!(tensor_to_proto(&t, "t").raw_data, Some(vec![0xF1, 0x07]));
        // uint2 [1, 2, 3, 0, 3]: 0b00_11_10_01, 0b11.
        let p = TensorProto {
            data_type: Some(25),
            dims: vec![5],
            raw_data: Some(vec![0b0011_1001, 0b11]),
            ..Default::default()
        };
        let t = tensor_from_proto(&p, &limits()).unwrap();
        assert!(t.data() == &TensorData::Bits(DType::U2, vec![1, 2, 3, 0, 3]));
        assert_eq!(
            tensor_from_proto(&tensor_to_proto(&t, "t"), &limits()).unwrap(),
            t
        );
        // uint4 in int32_data: one packed byte per int32.
        let p = TensorProto {
            data_type: Some(21),
            dims: vec![3],
            int32_data: vec![0x21, 0x03],
            ..Default::default()
        };
        let t = tensor_from_proto(&p, &limits()).unwrap();
        assert!(t.data() == &TensorData::Bits(DType::U4, vec![1, 2, 3]));
        // float8: one byte each, raw and int32_data.
        let p = TensorProto {
            data_type: Some(19),
            dims: vec![2],
            int32_data: vec![0x3C, 0x7C],
            ..Default::default()
        };
        let t = tensor_from_proto(&p, &limits()).unwrap();
        assert_eq!(t.to_f64_vec().unwrap(), vec![1.0, f64::INFINITY]);
        assert_eq!(
            tensor_from_proto(&tensor_to_proto(&t, "t"), &limits()).unwrap(),
            t
        );
        for code in 17..=26 {
            assert_eq!(dtype_to_onnx(dtype_from_onnx(code).unwrap()), code);
        }
    }

    #[test]
    fn typed_fields_decode() {
        let p = TensorProto {
            data_type: Some(10),
            dims: vec![2],
            int32_data: vec![
                f16::from_f32(1.0).to_bits() as i32,
                f16::from_f32(-2.5).to_bits() as i32,
            ],
            ..Default::default()
        };
        let t = tensor_from_proto(&p, &limits()).unwrap();
        assert_eq!(t.as_slice::<f16>().unwrap()[1], f16::from_f32(-2.5));
        let p = TensorProto {
            data_type: Some(12),
            dims: vec![1],
            uint64_data: vec![7],
            ..Default::default()
        };
        assert_eq!(
            tensor_from_proto(&p, &limits())
                .unwrap()
                .as_slice::<u32>()
                .unwrap(),
            &[7]
        );
    }

    #[test]
    fn rejects_bad_tensors() {
        let huge = TensorProto {
            data_type: Some(1),
            dims: vec![1 << 40],
            ..Default::default()
        };
        let e = tensor_from_proto(&huge, &limits()).unwrap_err().to_string();
        assert!(e.contains("over the limit"), "{e}");
        let short = TensorProto {
            data_type: Some(1),
            dims: vec![3],
            raw_data: Some(vec![0; 8]),
            ..Default::default()
        };
        assert!(tensor_from_proto(&short, &limits()).is_err());
        let neg = TensorProto {
            data_type: Some(1),
            dims: vec![-1],
            ..Default::default()
        };
        assert!(tensor_from_proto(&neg, &limits()).is_err());
        let f8 = TensorProto {
            data_type: Some(17),
            dims: vec![1],
            ..Default::default()
        };
        assert!(tensor_from_proto(&f8, &limits()).is_err());
        let c64 = TensorProto {
            data_type: Some(14),
            dims: vec![1],
            ..Default::default()
        };
        assert!(matches!(
            tensor_from_proto(&c64, &limits()),
            Err(OnnxError::UnsupportedFeature(_))
        ));
        // Packed int4: 3 elements need 2 bytes.
        let i4 = TensorProto {
            data_type: Some(22),
            dims: vec![3],
            raw_data: Some(vec![0x21]),
            ..Default::default()
        };
        assert!(tensor_from_proto(&i4, &limits()).is_err());
    }

    #[test]
    fn external_data_cannot_escape_the_model_folder() {
        let dir = std::env::temp_dir().join(format!("kiln-ext-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("m")).unwrap();
        std::fs::write(dir.join("m/w.bin"), 2.0f32.to_le_bytes()).unwrap();
        std::fs::write(dir.join("outside.bin"), 2.0f32.to_le_bytes()).unwrap();
        let lim = TensorLimits {
            base_dir: Some(dir.join("m")),
            max_tensor_bytes: 1 << 20,
        };
        let mk = |loc: &str| TensorProto {
            name: Some("w".into()),
            data_type: Some(1),
            dims: vec![1],
            data_location: Some(DataLocation::External as i32),
            external_data: vec![crate::proto::StringStringEntryProto {
                key: Some("location".into()),
                value: Some(loc.into()),
            }],
            ..Default::default()
        };
        assert_eq!(
            tensor_from_proto(&mk("w.bin"), &lim)
                .unwrap()
                .as_slice::<f32>()
                .unwrap(),
            &[2.0]
        );
        let e = tensor_from_proto(&mk("../outside.bin"), &lim)
            .unwrap_err()
            .to_string();
        assert!(e.contains("escapes"), "{e}");
        assert!(tensor_from_proto(&mk("/etc/passwd"), &lim).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
