//! Reading and writing NumPy `.npy` files (format versions 1-3).

use half::{bf16, f16};
use kiln_ir::{DType, Tensor, TensorData};

/// Parses a `.npy` file. Supports bool, ints, uints, f16, f32, f64 and unicode
/// strings (`<U`), little- or big-endian, C order.
pub fn read(bytes: &[u8]) -> Result<Tensor, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = bytes[6];
    let (header_len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or("truncated .npy header")?;
    let header =
        std::str::from_utf8(&bytes[start..end]).map_err(|_| "the .npy header is not text")?;
    let descr = dict_value(header, "descr").ok_or("the .npy header has no 'descr'")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let fortran =
        dict_value(header, "fortran_order").ok_or("the .npy header has no 'fortran_order'")?;
    if fortran.trim() == "True" {
        return Err(
            "Fortran-order arrays are not supported (save with np.ascontiguousarray)".into(),
        );
    }
    let shape_text = dict_value(header, "shape").ok_or("the .npy header has no 'shape'")?;
    let shape: Vec<usize> = shape_text
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad dimension '{s}' in the .npy shape"))
        })
        .collect::<Result<_, _>>()?;
    let numel = kiln_ir::checked_numel(&shape).ok_or("the .npy shape overflows")?;
    let body = &bytes[end..];
    let (order, kind, width) = parse_descr(descr)?;
    let big = order == '>';
    let need = numel
        .checked_mul(if kind == 'U' { width * 4 } else { width })
        .ok_or("the .npy shape overflows")?;
    if body.len() < need {
        return Err(format!(
            "the .npy data is truncated: {} bytes for {need} needed",
            body.len()
        ));
    }
    let body = &body[..need];
    macro_rules! num {
        ($t:ty, $n:expr) => {
            body.chunks_exact($n)
                .map(|c| {
                    let mut b = [0u8; $n];
                    b.copy_from_slice(c);
                    if big {
                        <$t>::from_be_bytes(b)
                    } else {
                        <$t>::from_le_bytes(b)
                    }
                })
                .collect::<Vec<$t>>()
        };
    }
    let data = match (kind, width) {
        ('b', 1) => TensorData::Bool(body.iter().map(|&b| b != 0).collect()),
        ('i', 1) => TensorData::I8(body.iter().map(|&b| b as i8).collect()),
        ('i', 2) => TensorData::I16(num!(i16, 2)),
        ('i', 4) => TensorData::I32(num!(i32, 4)),
        ('i', 8) => TensorData::I64(num!(i64, 8)),
        ('u', 1) => TensorData::U8(body.to_vec()),
        ('u', 2) => TensorData::U16(num!(u16, 2)),
        ('u', 4) => TensorData::U32(num!(u32, 4)),
        ('u', 8) => TensorData::U64(num!(u64, 8)),
        ('f', 2) => TensorData::F16(num!(u16, 2).into_iter().map(f16::from_bits).collect()),
        ('f', 4) => TensorData::F32(num!(f32, 4)),
        ('f', 8) => TensorData::F64(num!(f64, 8)),
        ('U', w) => {
            let chars = num!(u32, 4);
            let mut strings = Vec::with_capacity(numel);
            for chunk in chars.chunks(w.max(1)) {
                let s: String = chunk
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| char::from_u32(c).ok_or("invalid character in a .npy string"))
                    .collect::<Result<_, _>>()?;
                strings.push(s);
            }
            strings.truncate(numel);
            TensorData::String(strings)
        }
        _ => return Err(format!("unsupported .npy dtype '{descr}'")),
    };
    Tensor::new(shape, data).map_err(|e| e.to_string())
}

/// Extracts the text of `key`'s value from the header's Python dict literal.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat1 = format!("'{key}':");
    let pat2 = format!("\"{key}\":");
    let pos = header
        .find(&pat1)
        .map(|p| p + pat1.len())
        .or_else(|| header.find(&pat2).map(|p| p + pat2.len()))?;
    let rest = header[pos..].trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(&rest[..end])
}

fn parse_descr(descr: &str) -> Result<(char, char, usize), String> {
    let mut chars = descr.chars();
    let order = chars.next().ok_or("empty .npy descr")?;
    let (order, kind) = if matches!(order, '<' | '>' | '|' | '=') {
        (order, chars.next().ok_or("bad .npy descr")?)
    } else {
        ('|', order)
    };
    let width: usize = chars
        .as_str()
        .parse()
        .map_err(|_| format!("unsupported .npy dtype '{descr}'"))?;
    Ok((if order == '=' { '<' } else { order }, kind, width))
}

/// Serializes a tensor as a version-1 `.npy` file. bf16 has no NumPy dtype and
/// is written as f32 (exactly representable).
pub fn write(t: &Tensor) -> Vec<u8> {
    let mut body = Vec::with_capacity(t.byte_size());
    let descr: String = match t.data() {
        TensorData::F32(v) => {
            v.iter()
                .for_each(|x| body.extend_from_slice(&x.to_le_bytes()));
            "<f4".into()
        }
        TensorData::F64(v) => {
            v.iter()
                .for_each(|x| body.extend_from_slice(&x.to_le_bytes()));
            "<f8".into()
        }
        TensorData::F16(v) => {
            v.iter()
                .for_each(|x| body.extend_from_slice(&x.to_bits().to_le_bytes()));
            "<f2".into()
        }
        TensorData::BF16(v) => {
            v.iter()
                .for_each(|x: &bf16| body.extend_from_slice(&x.to_f32().to_le_bytes()));
            "<f4".into()
        }
        TensorData::I8(v) => {
            body.extend(v.iter().map(|&x| x as u8));
            "|i1".into()
        }
        TensorData::I16(v) => {
            v.iter()
                .for_each(|x| body.extend_from_slice(&x.to_le_bytes()));
            "<i2".into()
        }
        TensorData::I32(v) => {
            v.iter()
                .for_each(|x| body.extend_from_slice(&x.to_le_bytes()));
            "<i4".into()
        }
        TensorData::I64(v) => {
            v.iter()
                .for_each(|x| body.extend_from_slice(&x.to_le_bytes()));
            "<i8".into()
        }
        TensorData::U8(v) => {
            body.extend_from_slice(v);
            "|u1".into()
        }
        TensorData::U16(v) => {
            v.iter()
                .for_each(|x| body.extend_from_slice(&x.to_le_bytes()));
            "<u2".into()
        }
        TensorData::U32(v) => {
            v.iter()
                .for_each(|x| body.extend_from_slice(&x.to_le_bytes()));
            "<u4".into()
        }
        TensorData::U64(v) => {
            v.iter()
                .for_each(|x| body.extend_from_slice(&x.to_le_bytes()));
            "<u8".into()
        }
        TensorData::Bool(v) => {
            body.extend(v.iter().map(|&x| x as u8));
            "|b1".into()
        }
        TensorData::String(v) => {
            let width = v
                .iter()
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
                .max(1);
            for s in v {
                let mut n = 0;
                for c in s.chars() {
                    body.extend_from_slice(&(c as u32).to_le_bytes());
                    n += 1;
                }
                body.extend(std::iter::repeat_n(0u8, (width - n) * 4));
            }
            format!("<U{width}")
        }
        // npy has no low-precision types: small floats are written as their f32
        // values (like bf16), 4- and 2-bit integers as one byte each.
        TensorData::Bits(d, v) if d.is_small_int() => {
            body.extend(v.iter().map(|&b| d.decode_bits(b) as i8 as u8));
            if d.is_signed_small_int() {
                "|i1".into()
            } else {
                "|u1".into()
            }
        }
        TensorData::Bits(d, v) => {
            v.iter()
                .for_each(|&b| body.extend_from_slice(&d.decode_bits(b).to_le_bytes()));
            "<f4".into()
        }
    };
    let shape = match t.shape() {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so the data starts on a 64-byte boundary, header ending in '\n'.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + body.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    out
}

/// The dtype a tensor has after a write/read round trip.
#[allow(dead_code)]
pub fn written_dtype(d: DType) -> DType {
    if d == DType::BF16 {
        DType::F32
    } else {
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let cases = vec![
            Tensor::from_vec(vec![2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, -6.5]).unwrap(),
            Tensor::scalar(7i64),
            Tensor::from_vec(vec![0, 4], Vec::<f64>::new()).unwrap(),
            Tensor::from_vec(vec![3], vec![true, false, true]).unwrap(),
            Tensor::from_vec(vec![2], vec!["ab".to_string(), "ü".to_string()]).unwrap(),
            Tensor::from_vec(vec![1], vec![f16::from_f32(0.25)]).unwrap(),
        ];
        for t in cases {
            let bytes = write(&t);
            assert_eq!(
                (10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize) % 64,
                0
            );
            assert_eq!(read(&bytes).unwrap(), t);
        }
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(read(b"hello").is_err());
        let mut bytes = write(&Tensor::from_vec(vec![4], vec![1i32, 2, 3, 4]).unwrap());
        bytes.truncate(bytes.len() - 3);
        assert!(read(&bytes).unwrap_err().contains("truncated"));
    }
}
