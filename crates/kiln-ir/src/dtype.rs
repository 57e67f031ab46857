//! Element types. The set matches the ONNX tensor types kiln executes.
//!
//! The low-precision types (float8, float4, 4- and 2-bit integers, e8m0) are held
//! one element per byte: the element's bit pattern, sub-byte values in the low
//! bits. [`DType::decode_bits`] and [`DType::encode_f64`] convert them.

use std::fmt;

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
    String,
    /// float8 e4m3, finite-only: NaN is S.1111.111, no infinities.
    F8E4M3FN,
    /// float8 e4m3, bias 8, NaN is 0x80, no infinities and no negative zero.
    F8E4M3FNUZ,
    /// float8 e5m2 (IEEE-like: infinities and NaNs).
    F8E5M2,
    /// float8 e5m2, bias 16, NaN is 0x80, no infinities and no negative zero.
    F8E5M2FNUZ,
    /// float8 e8m0: a power of two 2^(bits - 127); 0xFF is NaN.
    F8E8M0,
    /// float4 e2m1: no NaN, no infinities.
    F4E2M1,
    I4,
    U4,
    I2,
    U2,
}

/// Parameters of a small float format: exponent bits, mantissa bits, bias, the
/// largest finite code (without sign), and its special encodings.
#[derive(Clone, Copy)]
struct SmallFloat {
    man: u32,
    bias: i32,
    max_code: u8,
    sign_bit: u8,
    /// NaN has a single code, 0x80 (the "fnuz" formats: no negative zero).
    fnuz: bool,
    /// Code (without sign) of NaN, when NaN is signed (e4m3fn, e5m2).
    nan: Option<u8>,
    /// Code (without sign) of infinity (e5m2 only).
    inf: Option<u8>,
}

impl DType {
    pub const ALL: [DType; 24] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::Bool,
        DType::String,
        DType::F8E4M3FN,
        DType::F8E4M3FNUZ,
        DType::F8E5M2,
        DType::F8E5M2FNUZ,
        DType::F8E8M0,
        DType::F4E2M1,
        DType::I4,
        DType::U4,
        DType::I2,
        DType::U2,
    ];

    /// Size of one element in bytes as kiln holds it (strings count as a
    /// pointer-sized handle; the low-precision types take one byte each).
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::String => std::mem::size_of::<String>(),
            _ => 1,
        }
    }

    /// Bits per element in the packed ONNX encoding (8 for byte-sized and larger
    /// types is not meaningful; only the low-precision types use this).
    pub fn bit_width(self) -> usize {
        match self {
            DType::F4E2M1 | DType::I4 | DType::U4 => 4,
            DType::I2 | DType::U2 => 2,
            other => other.size() * 8,
        }
    }

    /// Whether elements are held as bit patterns (`TensorData::Bits`).
    pub fn is_bits(self) -> bool {
        matches!(
            self,
            DType::F8E4M3FN
                | DType::F8E4M3FNUZ
                | DType::F8E5M2
                | DType::F8E5M2FNUZ
                | DType::F8E8M0
                | DType::F4E2M1
                | DType::I4
                | DType::U4
                | DType::I2
                | DType::U2
        )
    }

    /// The low-precision float types (float8 formats, e8m0, float4).
    pub fn is_small_float(self) -> bool {
        matches!(
            self,
            DType::F8E4M3FN
                | DType::F8E4M3FNUZ
                | DType::F8E5M2
                | DType::F8E5M2FNUZ
                | DType::F8E8M0
                | DType::F4E2M1
        )
    }

    /// The 4- and 2-bit integer types.
    pub fn is_small_int(self) -> bool {
        matches!(self, DType::I4 | DType::U4 | DType::I2 | DType::U2)
    }

    /// The signed 4- and 2-bit integer types.
    pub fn is_signed_small_int(self) -> bool {
        matches!(self, DType::I4 | DType::I2)
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    pub fn is_int(self) -> bool {
        matches!(
            self,
            DType::I8
                | DType::I16
                | DType::I32
                | DType::I64
                | DType::U8
                | DType::U16
                | DType::U32
                | DType::U64
        )
    }

    pub fn is_signed_int(self) -> bool {
        matches!(self, DType::I8 | DType::I16 | DType::I32 | DType::I64)
    }

    pub fn is_numeric(self) -> bool {
        self.is_float() || self.is_int()
    }

    /// The lowercase name used in messages and in `kiln inspect` ("f32", "i64", ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::Bool => "bool",
            DType::String => "string",
            DType::F8E4M3FN => "f8e4m3fn",
            DType::F8E4M3FNUZ => "f8e4m3fnuz",
            DType::F8E5M2 => "f8e5m2",
            DType::F8E5M2FNUZ => "f8e5m2fnuz",
            DType::F8E8M0 => "f8e8m0",
            DType::F4E2M1 => "f4e2m1",
            DType::I4 => "i4",
            DType::U4 => "u4",
            DType::I2 => "i2",
            DType::U2 => "u2",
        }
    }

    fn small_float(self) -> Option<SmallFloat> {
        Some(match self {
            DType::F8E4M3FN => SmallFloat {
                man: 3,
                bias: 7,
                max_code: 0x7E,
                sign_bit: 0x80,
                fnuz: false,
                nan: Some(0x7F),
                inf: None,
            },
            DType::F8E4M3FNUZ => SmallFloat {
                man: 3,
                bias: 8,
                max_code: 0x7F,
                sign_bit: 0x80,
                fnuz: true,
                nan: None,
                inf: None,
            },
            DType::F8E5M2 => SmallFloat {
                man: 2,
                bias: 15,
                max_code: 0x7B,
                sign_bit: 0x80,
                fnuz: false,
                nan: Some(0x7E),
                inf: Some(0x7C),
            },
            DType::F8E5M2FNUZ => SmallFloat {
                man: 2,
                bias: 16,
                max_code: 0x7F,
                sign_bit: 0x80,
                fnuz: true,
                nan: None,
                inf: None,
            },
            DType::F4E2M1 => SmallFloat {
                man: 1,
                bias: 1,
                max_code: 0x7,
                sign_bit: 0x8,
                fnuz: false,
                nan: None,
                inf: None,
            },
            _ => return None,
        })
    }

    /// The value of a low-precision element given its bit pattern (low bits).
    /// Integers give their value; floats their value (NaN, ±inf included).
    /// Other dtypes: the byte as an unsigned number.
    pub fn decode_bits(self, bits: u8) -> f32 {
        match self {
            DType::I4 => (((bits & 0xF) << 4) as i8 >> 4) as f32,
            DType::U4 => (bits & 0xF) as f32,
            DType::I2 => (((bits & 0x3) << 6) as i8 >> 6) as f32,
            DType::U2 => (bits & 0x3) as f32,
            DType::F8E8M0 => {
                if bits == 0xFF {
                    f32::NAN
                } else {
                    (2.0f64).powi(bits as i32 - 127) as f32
                }
            }
            _ => match self.small_float() {
                Some(f) => {
                    let b = bits & (f.sign_bit | (f.sign_bit - 1));
                    let neg = b & f.sign_bit != 0;
                    let code = b & !f.sign_bit;
                    if f.fnuz && b == 0x80 {
                        return f32::NAN;
                    }
                    if f.nan.is_some() && (code == 0x7F || (f.inf.is_some() && code > 0x7C)) {
                        return f32::NAN;
                    }
                    if f.inf == Some(code) {
                        return if neg {
                            f32::NEG_INFINITY
                        } else {
                            f32::INFINITY
                        };
                    }
                    let exp = (code >> f.man) as i32;
                    let mant = (code & ((1 << f.man) - 1)) as f64;
                    let scale = (1u32 << f.man) as f64;
                    let v = if exp == 0 {
                        mant / scale * 2f64.powi(1 - f.bias)
                    } else {
                        (1.0 + mant / scale) * 2f64.powi(exp - f.bias)
                    };
                    (if neg { -v } else { v }) as f32
                }
                None => bits as f32,
            },
        }
    }

    /// The bit pattern of `x` in a low-precision float type, rounding to nearest
    /// even. `saturate`: out-of-range values (infinities included) become the
    /// largest finite value of their sign; otherwise they become infinity where
    /// the format has it, NaN where it has not. float4 has neither, so it always
    /// saturates (NaN becomes the sign-flipped zero, as ml_dtypes does).
    /// For e8m0 see [`DType::encode_e8m0`]. For integer types: truncate toward
    /// zero and keep the low bits (wrapping), NaN and infinities giving 0.
    pub fn encode_f64(self, x: f64, saturate: bool) -> u8 {
        match self {
            DType::I4 | DType::U4 | DType::I2 | DType::U2 => {
                let i = if x.is_finite() { x.trunc() as i64 } else { 0 };
                let mask = if self.bit_width() == 4 { 0xF } else { 0x3 };
                return (i as u8) & mask;
            }
            DType::F8E8M0 => return DType::encode_e8m0(x as f32, saturate, "up"),
            _ => {}
        }
        let Some(f) = self.small_float() else {
            return 0;
        };
        let neg = x.is_sign_negative();
        let sign = if neg { f.sign_bit } else { 0 };
        let nan_code = |neg: bool| -> u8 {
            match f.nan {
                Some(n) => n | if neg { f.sign_bit } else { 0 },
                None if f.fnuz => 0x80,
                // float4: ml_dtypes maps NaN to zero with the sign bit flipped.
                None => {
                    if neg {
                        0
                    } else {
                        f.sign_bit
                    }
                }
            }
        };
        if x.is_nan() {
            return nan_code(neg);
        }
        let overflow = || -> u8 {
            if saturate || self == DType::F4E2M1 {
                f.max_code | sign
            } else if let Some(inf) = f.inf {
                inf | sign
            } else {
                nan_code(neg)
            }
        };
        if x.is_infinite() {
            return overflow();
        }
        let a = x.abs();
        let zero = if f.fnuz { 0 } else { sign };
        if a == 0.0 {
            return zero;
        }
        let emin = 1 - f.bias;
        // Exponent of a: a = m * 2^e with m in [1, 2).
        let e = {
            let bits = a.to_bits();
            let be = ((bits >> 52) & 0x7FF) as i32;
            if be == 0 {
                // f64 subnormal: far below any small format's range.
                emin - 100
            } else {
                be - 1023
            }
        };
        let e = e.max(emin);
        // q = a / 2^(e - man): exact (power-of-two scaling), small.
        let q = a * 2f64.powi(f.man as i32 - e);
        if q >= 1e6 {
            return overflow();
        }
        let mut qi = q.round_ties_even() as u32;
        let mut e = e;
        if qi >= (2u32 << f.man) {
            qi >>= 1;
            e += 1;
        }
        if qi == 0 {
            return zero;
        }
        let code: u32 = if qi < (1u32 << f.man) {
            qi
        } else {
            let biased = e + f.bias;
            if biased > 15 * 2 + 2 {
                return overflow();
            }
            ((biased as u32) << f.man) | (qi - (1 << f.man))
        };
        if code > f.max_code as u32 {
            return overflow();
        }
        code as u8 | sign
    }

    /// float32 -> e8m0 bit pattern: the exponent field of `x` (its sign is
    /// dropped), rounded per `round_mode` ("up", "down" or "nearest", the values
    /// of Cast's attribute; anything else rounds up); NaN and infinities give
    /// 0xFF. With `saturate`, rounding never goes past 0xFE.
    pub fn encode_e8m0(x: f32, saturate: bool, round_mode: &str) -> u8 {
        let bits = x.to_bits();
        let exp = (bits >> 23) & 0xFF;
        if exp == 0xFF {
            return 0xFF;
        }
        let up = match round_mode {
            "down" => false,
            "nearest" => {
                let g = bits & 0x40_0000 != 0;
                let r = bits & 0x20_0000 != 0;
                let s = bits & 0x1F_FFFF != 0;
                let lsb = exp > 0;
                g && (r || s || lsb)
            }
            _ => bits & 0x7F_FFFF != 0,
        };
        if up && !(saturate && exp == 0xFE) {
            (exp + 1) as u8
        } else {
            exp as u8
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float8_roundtrip_every_code() {
        for dt in [
            DType::F8E4M3FN,
            DType::F8E4M3FNUZ,
            DType::F8E5M2,
            DType::F8E5M2FNUZ,
        ] {
            for b in 0..=255u8 {
                let v = dt.decode_bits(b);
                if v.is_nan() {
                    continue;
                }
                if v == 0.0 && b != 0 {
                    assert_eq!(b, 0x80, "{dt}");
                    continue;
                }
                assert_eq!(dt.encode_f64(v as f64, false), b, "{dt} {b:#x} {v}");
            }
        }
        for b in 0..16u8 {
            let v = DType::F4E2M1.decode_bits(b);
            if b == 8 {
                assert_eq!(v, 0.0);
                continue;
            }
            assert_eq!(DType::F4E2M1.encode_f64(v as f64, true), b);
        }
    }

    #[test]
    fn float8_special_values() {
        let e4 = DType::F8E4M3FN;
        assert_eq!(e4.decode_bits(0x7E), 448.0);
        assert_eq!(e4.decode_bits(0x01), 2f32.powi(-9));
        assert!(e4.decode_bits(0xFF).is_nan());
        assert_eq!(e4.encode_f64(1e6, true), 0x7E);
        assert_eq!(e4.encode_f64(1e6, false), 0x7F);
        assert_eq!(e4.encode_f64(f64::NEG_INFINITY, true), 0xFE);
        assert_eq!(e4.encode_f64(f64::NAN, true), 0x7F);
        // 464 is the midpoint of 448 and 480 (not representable): ties to even.
        assert_eq!(e4.encode_f64(464.0, false), 0x7E);
        assert_eq!(e4.encode_f64(470.0, false), 0x7F);
        assert_eq!(e4.encode_f64(-0.0, true), 0x80);
        assert_eq!(e4.encode_f64(1e-7, true), 0);
        let e5 = DType::F8E5M2;
        assert_eq!(e5.decode_bits(0x7B), 57344.0);
        assert_eq!(e5.decode_bits(0xFC), f32::NEG_INFINITY);
        assert_eq!(e5.encode_f64(1e6, false), 0x7C);
        assert_eq!(e5.encode_f64(1e6, true), 0x7B);
        assert_eq!(e5.encode_f64(f64::NAN, true), 0x7E);
        let uz = DType::F8E5M2FNUZ;
        assert_eq!(uz.encode_f64(-0.0, true), 0);
        assert_eq!(uz.encode_f64(f64::INFINITY, false), 0x80);
        assert_eq!(uz.encode_f64(f64::INFINITY, true), 0x7F);
        assert_eq!(DType::F8E4M3FNUZ.decode_bits(0x7F), 240.0);
        assert!(DType::F8E4M3FNUZ.decode_bits(0x80).is_nan());
        // float4
        let f4 = DType::F4E2M1;
        assert_eq!(f4.encode_f64(0.25, true), 0); // tie between 0 and 0.5 -> even
        assert_eq!(f4.encode_f64(1e6, false), 7);
        assert_eq!(f4.encode_f64(-3.5, true), 0xE);
        assert_eq!(f4.decode_bits(0xF), -6.0);
    }

    #[test]
    fn e8m0_and_small_ints() {
        assert_eq!(DType::F8E8M0.decode_bits(127), 1.0);
        assert!(DType::F8E8M0.decode_bits(255).is_nan());
        assert_eq!(DType::encode_e8m0(3.0, true, "up"), 129);
        assert_eq!(DType::encode_e8m0(3.0, true, "down"), 128);
        assert_eq!(DType::encode_e8m0(3.0, true, "nearest"), 129);
        assert_eq!(DType::encode_e8m0(2.5, true, "nearest"), 128);
        assert_eq!(DType::encode_e8m0(0.0, true, "up"), 0);
        assert_eq!(DType::encode_e8m0(f32::MAX, true, "up"), 254);
        assert_eq!(DType::encode_e8m0(f32::MAX, false, "up"), 255);
        assert_eq!(DType::I4.decode_bits(0xF), -1.0);
        assert_eq!(DType::I4.decode_bits(0x8), -8.0);
        assert_eq!(DType::I2.decode_bits(0x2), -2.0);
        assert_eq!(DType::U2.decode_bits(0x3), 3.0);
        assert_eq!(DType::I4.encode_f64(-9.0, true), 7);
        assert_eq!(DType::U4.encode_f64(-2.5, true), 14);
        assert_eq!(DType::I2.encode_f64(2.0, true), 2);
    }
}
