//! Kernels for the `QuantOp` family (see `kiln_ir::op_quant`).

use crate::elementwise::cast_with;
use crate::util::{normalize_axis, tensor};
use crate::{invalid, required, unsupported, Result};
use kiln_ir::{checked_numel, DType, Op, QuantOp, Tensor, TensorData};

/// Runs one op of the family on its present inputs.
pub fn run(op: &QuantOp, inputs: &[Option<&Tensor>], num_outputs: usize) -> Result<Vec<Tensor>> {
    let x = |i: usize, what: &str| required(inputs, i, what);
    let opt = |i: usize| inputs.get(i).copied().flatten();
    let _ = num_outputs;
    match op {
        QuantOp::Cast {
            to,
            saturate,
            round_mode,
        } => {
            let to = match to {
                Some(t) => *t,
                None => x(1, "target_type")?.dtype(),
            };
            Ok(vec![cast_with(x(0, "input")?, to, *saturate, round_mode)?])
        }
        QuantOp::QuantizeLinear {
            axis,
            block_size,
            saturate,
            output_dtype,
            precision,
        } => Ok(vec![quantize(
            x(0, "x")?,
            x(1, "y_scale")?,
            opt(2),
            *axis,
            *block_size,
            *saturate,
            *output_dtype,
            *precision,
        )?]),
        QuantOp::DequantizeLinear {
            axis,
            block_size,
            output_dtype,
        } => Ok(vec![dequantize(
            x(0, "x")?,
            x(1, "x_scale")?,
            opt(2),
            *axis,
            *block_size,
            *output_dtype,
        )?]),
        QuantOp::DynamicQuantizeLinear => dynamic_quantize(x(0, "x")?),
        QuantOp::MatMulInteger => Ok(vec![matmul_integer(
            x(0, "A")?,
            x(1, "B")?,
            opt(2),
            opt(3),
        )?]),
        QuantOp::BitCast { to } => Ok(vec![bitcast(x(0, "input")?, *to)?]),
        QuantOp::QLinearMatMul => {
            let a = x(0, "a")?;
            let b = x(3, "b")?;
            let ac = centered_axis(a, opt(2), a.rank().saturating_sub(2), "a")?;
            let bc = centered_axis(b, opt(5), b.rank().saturating_sub(1), "b")?;
            let c = first(crate::run_op(&Op::MatMul, &[Some(&ac), Some(&bc)], 1)?)?;
            let rank = c.rank();
            requantize(
                &c,
                x(1, "a_scale")?,
                rank.checked_sub(2),
                x(4, "b_scale")?,
                rank.checked_sub(1),
                x(6, "y_scale")?,
                opt(7),
                a.dtype(),
            )
            .map(|t| vec![t])
        }
        QuantOp::ConvInteger(attrs) => {
            let xc = centered_axis(x(0, "x")?, opt(2), 1, "x")?;
            let wc = centered_axis(x(1, "w")?, opt(3), 0, "w")?;
            let y = first(crate::run_op(
                &Op::Conv(attrs.clone()),
                &[Some(&xc), Some(&wc)],
                1,
            )?)?;
            Ok(vec![cast_with(&y, DType::I32, true, "up")?])
        }
        QuantOp::QLinearConv(attrs) => {
            let xt = x(0, "x")?;
            let xc = centered_axis(xt, opt(2), 1, "x")?;
            let wc = centered_axis(x(3, "w")?, opt(5), 0, "w")?;
            let bias = match opt(8) {
                Some(b) if b.dtype() == DType::I32 => Some(cast_with(b, DType::F64, true, "up")?),
                Some(b) => return Err(invalid!("QLinearConv: B must be i32, got {}", b.dtype())),
                None => None,
            };
            let y = first(crate::run_op(
                &Op::Conv(attrs.clone()),
                &[Some(&xc), Some(&wc), bias.as_ref()],
                1,
            )?)?;
            requantize(
                &y,
                x(1, "x_scale")?,
                None,
                x(4, "w_scale")?,
                Some(1),
                x(6, "y_scale")?,
                opt(7),
                xt.dtype(),
            )
            .map(|t| vec![t])
        }
    }
}

/// Maps each element of x (flat index) to its scale / zero-point element:
/// per-tensor, per-axis or blocked along `axis`.
struct ParamIndex {
    /// None: per-tensor.
    layout: Option<(usize, usize, usize, usize)>, // inner, dim, param dim, block
}

impl ParamIndex {
    fn new(
        name: &str,
        x: &[usize],
        p: &[usize],
        axis: i64,
        block_size: usize,
    ) -> Result<ParamIndex> {
        let numel = checked_numel(p).unwrap_or(usize::MAX);
        if block_size == 0 {
            if p.len() <= 1 && numel == 1 {
                return Ok(ParamIndex { layout: None });
            }
            let ax = normalize_axis(axis, x.len()).map_err(|e| invalid!("{name}: {e}"))?;
            if p.len() != 1 || p[0] != x[ax] {
                return Err(invalid!(
                    "{name}: a per-axis scale / zero point must be 1-D of size {} (axis {axis} of {x:?}), got shape {p:?}",
                    x[ax]
                ));
            }
            let inner = x[ax + 1..].iter().product();
            // Block size 0 marks the per-axis layout (index = coordinate on axis).
            return Ok(ParamIndex {
                layout: Some((inner, x[ax], x[ax], 0)),
            });
        }
        let ax = normalize_axis(axis, x.len()).map_err(|e| invalid!("{name}: {e}"))?;
        let ok = p.len() == x.len()
            && p.iter().zip(x).enumerate().all(|(d, (&a, &b))| {
                if d == ax {
                    a == b.div_ceil(block_size)
                } else {
                    a == b
                }
            });
        if !ok {
            return Err(invalid!(
                "{name}: with block_size {block_size} on axis {axis}, the scale / zero point of x {x:?} must have x's shape with ceil(dim / block_size) on the axis, got {p:?}"
            ));
        }
        let inner = x[ax + 1..].iter().product();
        Ok(ParamIndex {
            layout: Some((inner, x[ax], p[ax], block_size)),
        })
    }

    fn at(&self, i: usize) -> usize {
        match self.layout {
            None => 0,
            Some((inner, dim, _, 0)) if inner > 0 && dim > 0 => (i / inner) % dim,
            Some((inner, dim, pdim, block)) if inner > 0 && dim > 0 => {
                let c = (i / inner) % dim;
                let outer = i / (inner * dim);
                (outer * pdim + c / block) * inner + i % inner
            }
            Some(_) => 0,
        }
    }
}

/// Range of an integer quantization type.
fn int_range(d: DType) -> Option<(i64, i64)> {
    Some(match d {
        DType::U8 => (0, 255),
        DType::I8 => (-128, 127),
        DType::U16 => (0, 65535),
        DType::I16 => (-32768, 32767),
        DType::U4 => (0, 15),
        DType::I4 => (-8, 7),
        DType::U2 => (0, 3),
        DType::I2 => (-2, 1),
        _ => return None,
    })
}

fn f64_values(t: &Tensor, what: &str) -> Result<Vec<f64>> {
    t.to_f64_vec().map_err(|e| invalid!("{what}: {e}"))
}

/// `v / s` rounded as the division in dtype `prec` would be.
fn divide(v: f64, s: f64, prec: DType) -> f64 {
    match prec {
        DType::F64 => v / s,
        DType::F16 => half::f16::from_f32(v as f32 / s as f32).to_f64(),
        DType::BF16 => half::bf16::from_f32(v as f32 / s as f32).to_f64(),
        DType::F32 => (v as f32 / s as f32) as f64,
        // int32 x divides in f64, as numpy does for int32 / float32.
        _ => v / s,
    }
}

#[allow(clippy::too_many_arguments)]
fn quantize(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    axis: i64,
    block_size: usize,
    saturate: bool,
    output_dtype: Option<DType>,
    precision: Option<DType>,
) -> Result<Tensor> {
    let name = "QuantizeLinear";
    if !(x.dtype().is_float() || x.dtype() == DType::I32) {
        return Err(unsupported!("{name} of {} input", x.dtype()));
    }
    if !scale.dtype().is_float() && scale.dtype() != DType::I32 {
        return Err(invalid!(
            "{name}: the scale must be a float, got {}",
            scale.dtype()
        ));
    }
    let to = match (zp, output_dtype) {
        (Some(z), Some(o)) if z.dtype() != o => {
            return Err(invalid!(
                "{name}: output_dtype {o} differs from the zero point's dtype {}",
                z.dtype()
            ))
        }
        (Some(z), _) => z.dtype(),
        (None, Some(o)) => o,
        (None, None) => DType::U8,
    };
    let sidx = ParamIndex::new(name, x.shape(), scale.shape(), axis, block_size)?;
    let zidx = match zp {
        Some(z) => {
            let one = |t: &Tensor| t.len() == 1 && t.rank() <= 1;
            if z.shape() != scale.shape() && !(one(z) && one(scale)) {
                return Err(invalid!(
                    "{name}: zero point shape {:?} differs from the scale's {:?}",
                    z.shape(),
                    scale.shape()
                ));
            }
            Some(ParamIndex::new(
                name,
                x.shape(),
                z.shape(),
                axis,
                block_size,
            )?)
        }
        None => None,
    };
    let xs = f64_values(x, name)?;
    let ss = f64_values(scale, name)?;
    let zs = match zp {
        Some(z) => f64_values(z, name)?,
        None => vec![],
    };
    let prec = precision.unwrap_or(x.dtype());
    let q = |i: usize, v: f64| divide(v, ss.get(sidx.at(i)).copied().unwrap_or(1.0), prec);
    let z = |i: usize| match &zidx {
        Some(zi) => zs.get(zi.at(i)).copied().unwrap_or(0.0),
        None => 0.0,
    };
    let data = if let Some((lo, hi)) = int_range(to) {
        let vals: Vec<i64> = xs
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let r = q(i, v).round_ties_even();
                let r = if r.is_nan() {
                    0
                } else {
                    r.clamp(-1e18, 1e18) as i64
                };
                (r + z(i) as i64).clamp(lo, hi)
            })
            .collect();
        match to {
            DType::U8 => TensorData::U8(vals.iter().map(|&v| v as u8).collect()),
            DType::I8 => TensorData::I8(vals.iter().map(|&v| v as i8).collect()),
            DType::U16 => TensorData::U16(vals.iter().map(|&v| v as u16).collect()),
            DType::I16 => TensorData::I16(vals.iter().map(|&v| v as i16).collect()),
            d => {
                let mask = if d.bit_width() == 4 { 0xF } else { 0x3 };
                TensorData::Bits(d, vals.iter().map(|&v| (v as u8) & mask).collect())
            }
        }
    } else if matches!(
        to,
        DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ
    ) {
        // The zero point of a float8 type is zero; the quotient is rounded as a
        // value of x's precision first.
        let bits = xs
            .iter()
            .enumerate()
            .map(|(i, &v)| to.encode_f64(q(i, v), saturate))
            .collect();
        TensorData::Bits(to, bits)
    } else if to == DType::F4E2M1 {
        let bits = xs
            .iter()
            .enumerate()
            .map(|(i, &v)| to.encode_f64((q(i, v) as f32 + z(i) as f32) as f64, true))
            .collect();
        TensorData::Bits(to, bits)
    } else {
        return Err(invalid!("{name}: {to} is not a quantized type"));
    };
    tensor(x.shape().to_vec(), data)
}

fn dequantize(
    x: &Tensor,
    scale: &Tensor,
    zp: Option<&Tensor>,
    axis: i64,
    block_size: usize,
    output_dtype: Option<DType>,
) -> Result<Tensor> {
    let name = "DequantizeLinear";
    let xd = x.dtype();
    let small_float = xd.is_small_float();
    if !(int_range(xd).is_some() || xd == DType::I32 || small_float) {
        return Err(unsupported!("{name} of {xd} input"));
    }
    if !scale.dtype().is_float() {
        return Err(invalid!(
            "{name}: the scale must be a float, got {}",
            scale.dtype()
        ));
    }
    let sidx = ParamIndex::new(name, x.shape(), scale.shape(), axis, block_size)?;
    let mut zs = vec![];
    let mut zidx = None;
    if let Some(z) = zp {
        if small_float {
            if f64_values(z, name)?.iter().any(|&v| v != 0.0) {
                return Err(invalid!(
                    "{name}: the zero point of a {xd} input must be zero"
                ));
            }
        } else {
            if z.dtype() != xd {
                return Err(invalid!(
                    "{name}: zero point dtype {} differs from x's {xd}",
                    z.dtype()
                ));
            }
            zidx = Some(ParamIndex::new(
                name,
                x.shape(),
                z.shape(),
                axis,
                block_size,
            )?);
            zs = f64_values(z, name)?;
        }
    }
    let xs = f64_values(x, name)?;
    let ss = f64_values(scale, name)?;
    let z = |i: usize| match &zidx {
        Some(zi) => zs.get(zi.at(i)).copied().unwrap_or(0.0),
        None => 0.0,
    };
    let s = |i: usize| ss.get(sidx.at(i)).copied().unwrap_or(0.0);
    let wide = if xd == DType::I32 {
        let v = xs
            .iter()
            .enumerate()
            .map(|(i, &v)| (v - z(i)) * s(i))
            .collect();
        tensor(x.shape().to_vec(), TensorData::F64(v))?
    } else {
        let v = xs
            .iter()
            .enumerate()
            .map(|(i, &v)| (v - z(i)) as f32 * s(i) as f32)
            .collect();
        tensor(x.shape().to_vec(), TensorData::F32(v))?
    };
    let out = output_dtype.unwrap_or(scale.dtype());
    cast_with(&wide, out, true, "up")
}

fn dynamic_quantize(x: &Tensor) -> Result<Vec<Tensor>> {
    let v = x
        .as_slice::<f32>()
        .ok_or_else(|| unsupported!("DynamicQuantizeLinear of {} input", x.dtype()))?;
    let max = v.iter().fold(0.0f32, |m, &a| if a > m { a } else { m });
    let min = v.iter().fold(0.0f32, |m, &a| if a < m { a } else { m });
    let scale = if max == min { 1.0 } else { max - min } / 255.0f32;
    let zp = (0.0f32 - min / scale).clamp(0.0, 255.0).round_ties_even();
    let y: Vec<u8> = v
        .iter()
        .map(|&a| ((a / scale).round_ties_even() + zp).clamp(0.0, 255.0) as u8)
        .collect();
    Ok(vec![
        tensor(x.shape().to_vec(), TensorData::U8(y))?,
        Tensor::scalar(scale),
        Tensor::scalar(zp as u8),
    ])
}

fn first(v: Vec<Tensor>) -> Result<Tensor> {
    v.into_iter()
        .next()
        .ok_or_else(|| invalid!("the inner op gave no output"))
}

/// `t - zp` in f64 (t: u8 or i8); zp is a scalar (or 1-element vector) or a
/// vector along axis `ax` of t.
fn centered_axis(t: &Tensor, zp: Option<&Tensor>, ax: usize, what: &str) -> Result<Tensor> {
    if !matches!(t.dtype(), DType::U8 | DType::I8) {
        return Err(unsupported!("quantized {what} of type {}", t.dtype()));
    }
    let mut v = f64_values(t, what)?;
    if let Some(z) = zp {
        if z.dtype() != t.dtype() {
            return Err(invalid!(
                "{what}'s zero point is {} but {what} is {}",
                z.dtype(),
                t.dtype()
            ));
        }
        let zs = f64_values(z, what)?;
        let idx = axis_index(t.shape(), Some(ax), zs.len(), z.rank(), what)?;
        for (i, e) in v.iter_mut().enumerate() {
            *e -= zs.get(idx(i)).copied().unwrap_or(0.0);
        }
    }
    tensor(t.shape().to_vec(), TensorData::F64(v))
}

/// For a parameter of `len` values (scalar, or a vector along `ax` of `shape`),
/// the parameter index of each flat element index.
fn axis_index(
    shape: &[usize],
    ax: Option<usize>,
    len: usize,
    rank: usize,
    what: &str,
) -> Result<impl Fn(usize) -> usize> {
    if len == 1 && rank <= 1 {
        return Ok(Box::new(|_: usize| 0usize) as Box<dyn Fn(usize) -> usize>);
    }
    match ax {
        Some(ax) if ax < shape.len() && rank == 1 && shape[ax] == len => {
            let inner: usize = shape[ax + 1..].iter().product();
            let dim = shape[ax];
            Ok(Box::new(move |i: usize| (i / inner.max(1)) % dim.max(1)) as Box<dyn Fn(usize) -> usize>)
        }
        _ => Err(invalid!(
            "{what}: a scale / zero point must be a scalar or a vector along the quantized axis of {shape:?}, got {len} values"
        )),
    }
}

/// `round(c * (s1 * s2 / ys) + yz)` clipped to the output type (yz's, else
/// `default`), with the scale product in the scales' precision and the rest
/// in f64 (as numpy does for int32 * float).
#[allow(clippy::too_many_arguments)]
fn requantize(
    c: &Tensor,
    s1: &Tensor,
    s1_axis: Option<usize>,
    s2: &Tensor,
    s2_axis: Option<usize>,
    ys: &Tensor,
    yz: Option<&Tensor>,
    default: DType,
) -> Result<Tensor> {
    let to = yz.map(|z| z.dtype()).unwrap_or(default);
    let (lo, hi) = match to {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        d => return Err(unsupported!("requantizing to {d}")),
    };
    let prec = s1.dtype();
    if !prec.is_float() {
        return Err(invalid!("scales must be floats, got {prec}"));
    }
    let shape = c.shape();
    let v1 = f64_values(s1, "scale")?;
    let v2 = f64_values(s2, "scale")?;
    let vy = f64_values(ys, "y_scale")?;
    if vy.len() != 1 {
        return Err(unsupported!("a y_scale with {} values", vy.len()));
    }
    let i1 = axis_index(shape, s1_axis, v1.len(), s1.rank(), "scale")?;
    let i2 = axis_index(shape, s2_axis, v2.len(), s2.rank(), "scale")?;
    let zv = match yz {
        Some(z) => {
            let zs = f64_values(z, "y_zero_point")?;
            if zs.len() != 1 {
                return Err(unsupported!("a y_zero_point with {} values", zs.len()));
            }
            zs[0]
        }
        None => 0.0,
    };
    let m = |a: f64, b: f64| -> f64 {
        match prec {
            DType::F16 => {
                let p = half::f16::from_f64(a) * half::f16::from_f64(b);
                (p / half::f16::from_f64(vy[0])).to_f64()
            }
            DType::BF16 => {
                let p = half::bf16::from_f64(a) * half::bf16::from_f64(b);
                (p / half::bf16::from_f64(vy[0])).to_f64()
            }
            DType::F64 => a * b / vy[0],
            _ => ((a as f32 * b as f32) / vy[0] as f32) as f64,
        }
    };
    let cs = f64_values(c, "product")?;
    let out: Vec<f64> = cs
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let s = m(
                v1.get(i1(i)).copied().unwrap_or(0.0),
                v2.get(i2(i)).copied().unwrap_or(0.0),
            );
            (x * s + zv).clamp(lo, hi).round_ties_even()
        })
        .collect();
    let data = match to {
        DType::U8 => TensorData::U8(out.iter().map(|&v| v as u8).collect()),
        _ => TensorData::I8(out.iter().map(|&v| v as i8).collect()),
    };
    tensor(shape.to_vec(), data)
}

/// `t - zp` widened to f64, where zp is a scalar or a 1-D vector along the
/// row (`per = Some(cols)`: index (i / cols) % rows) or column axis.
fn centered(t: &Tensor, zp: Option<&Tensor>, row_axis: bool, what: &str) -> Result<Tensor> {
    if !matches!(t.dtype(), DType::U8 | DType::I8) {
        return Err(unsupported!("MatMulInteger of {} {what}", t.dtype()));
    }
    let mut v = f64_values(t, what)?;
    if let Some(z) = zp {
        if z.dtype() != t.dtype() {
            return Err(invalid!(
                "MatMulInteger: {what}'s zero point is {} but {what} is {}",
                z.dtype(),
                t.dtype()
            ));
        }
        let zs = f64_values(z, what)?;
        let r = t.rank();
        let (cols, rows) = match t.shape() {
            [.., a, b] => (*b, *a),
            [b] => (*b, 1),
            [] => (1, 1),
        };
        let len = if row_axis { rows } else { cols };
        if zs.len() != 1 && (zs.len() != len || z.rank() > 1 || r == 0) {
            return Err(invalid!(
                "MatMulInteger: {what}'s zero point must be a scalar or hold {len} values, got shape {:?}",
                z.shape()
            ));
        }
        for (i, e) in v.iter_mut().enumerate() {
            let k = if zs.len() == 1 {
                0
            } else if row_axis {
                (i / cols.max(1)) % rows.max(1)
            } else {
                i % cols.max(1)
            };
            *e -= zs.get(k).copied().unwrap_or(0.0);
        }
    }
    tensor(t.shape().to_vec(), TensorData::F64(v))
}

fn matmul_integer(
    a: &Tensor,
    b: &Tensor,
    az: Option<&Tensor>,
    bz: Option<&Tensor>,
) -> Result<Tensor> {
    let a = centered(a, az, true, "A")?;
    let b = centered(b, bz, false, "B")?;
    let y = crate::run_op(&Op::MatMul, &[Some(&a), Some(&b)], 1)?;
    let y = y
        .into_iter()
        .next()
        .ok_or_else(|| invalid!("MatMulInteger: MatMul gave no output"))?;
    // Exact: |products| < 2^16 and sums stay far below 2^53 for any real size.
    cast_with(&y, DType::I32, true, "up")
}

/// Little-endian bytes of every element.
fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(t.byte_size());
    macro_rules! le {
        ($v:expr) => {
            $v.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()))
        };
    }
    match t.data() {
        TensorData::F32(v) => le!(v),
        TensorData::F64(v) => le!(v),
        TensorData::F16(v) => le!(v),
        TensorData::BF16(v) => le!(v),
        TensorData::I8(v) => le!(v),
        TensorData::I16(v) => le!(v),
        TensorData::I32(v) => le!(v),
        TensorData::I64(v) => le!(v),
        TensorData::U8(v) => le!(v),
        TensorData::U16(v) => le!(v),
        TensorData::U32(v) => le!(v),
        TensorData::U64(v) => le!(v),
        TensorData::Bool(v) => v.iter().for_each(|&b| out.push(b as u8)),
        TensorData::Bits(_, v) => out.extend_from_slice(v),
        TensorData::String(_) => return Err(invalid!("BitCast: string tensors have no bits")),
    }
    Ok(out)
}

fn from_bytes(to: DType, b: &[u8]) -> Result<TensorData> {
    macro_rules! le {
        ($t:ty, $variant:ident) => {{
            const N: usize = std::mem::size_of::<$t>();
            TensorData::$variant(
                b.chunks_exact(N)
                    .map(|c| {
                        let mut a = [0u8; N];
                        a.copy_from_slice(c);
                        <$t>::from_le_bytes(a)
                    })
                    .collect(),
            )
        }};
    }
    Ok(match to {
        DType::F32 => le!(f32, F32),
        DType::F64 => le!(f64, F64),
        DType::F16 => le!(half::f16, F16),
        DType::BF16 => le!(half::bf16, BF16),
        DType::I8 => le!(i8, I8),
        DType::I16 => le!(i16, I16),
        DType::I32 => le!(i32, I32),
        DType::I64 => le!(i64, I64),
        DType::U8 => le!(u8, U8),
        DType::U16 => le!(u16, U16),
        DType::U32 => le!(u32, U32),
        DType::U64 => le!(u64, U64),
        DType::Bool => TensorData::Bool(b.iter().map(|&x| x != 0).collect()),
        DType::String => return Err(invalid!("BitCast: cannot produce string tensors")),
        d => TensorData::Bits(d, b.to_vec()),
    })
}

fn bitcast(x: &Tensor, to: DType) -> Result<Tensor> {
    let from = x.dtype();
    if from == DType::String || to == DType::String || from.bit_width() != to.bit_width() {
        return Err(invalid!(
            "BitCast: {from} and {to} must be non-string types of the same bit width"
        ));
    }
    if from.bit_width() < 8 {
        // Sub-byte types keep their bit patterns one per byte.
        if let TensorData::Bits(_, v) = x.data() {
            return tensor(x.shape().to_vec(), TensorData::Bits(to, v.clone()));
        }
    }
    let bytes = to_bytes(x)?;
    tensor(x.shape().to_vec(), from_bytes(to, &bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(op: QuantOp, inputs: &[Option<&Tensor>], n: usize) -> Result<Vec<Tensor>> {
        run(&op, inputs, n)
    }

    fn ql(axis: i64, block_size: usize, out: Option<DType>) -> QuantOp {
        QuantOp::QuantizeLinear {
            axis,
            block_size,
            saturate: true,
            output_dtype: out,
            precision: None,
        }
    }

    #[test]
    fn quantize_per_tensor_rounds_half_even_and_saturates() {
        let x = Tensor::vector(vec![0.0f32, 2.0, 3.0, 5.0, -1.0, 1000.0, -1000.0]);
        let s = Tensor::scalar(2.0f32);
        let z = Tensor::scalar(128u8);
        let y = q(ql(1, 0, None), &[Some(&x), Some(&s), Some(&z)], 1).unwrap();
        // 1 -> 1, 1.5 -> 2, 2.5 -> 2, -0.5 -> -0 (+128), saturated ends.
        assert_eq!(
            y[0].as_slice::<u8>().unwrap(),
            &[128, 129, 130, 130, 128, 255, 0]
        );
        // No zero point: u8 with zero point 0.
        let y = q(ql(1, 0, None), &[Some(&x), Some(&s)], 1).unwrap();
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[0, 1, 2, 2, 0, 255, 0]);
        // int4 output via output_dtype.
        let y = q(ql(1, 0, Some(DType::I4)), &[Some(&x), Some(&s)], 1).unwrap();
        assert!(y[0].data() == &TensorData::Bits(DType::I4, vec![0, 1, 2, 2, 0, 7, 8]));
    }

    #[test]
    fn quantize_per_axis_and_blocked() {
        let x = Tensor::from_vec(
            vec![2, 4],
            vec![1.0f32, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0],
        )
        .unwrap();
        let s = Tensor::vector(vec![1.0f32, 10.0]);
        let y = q(ql(0, 0, Some(DType::I8)), &[Some(&x), Some(&s)], 1).unwrap();
        assert_eq!(y[0].as_slice::<i8>().unwrap(), &[1, 2, 3, 4, 1, 2, 3, 4]);
        // Negative axis, blocks of 2 along the last axis.
        let s = Tensor::from_vec(vec![2, 2], vec![1.0f32, 2.0, 10.0, 20.0]).unwrap();
        let y = q(ql(-1, 2, Some(DType::I8)), &[Some(&x), Some(&s)], 1).unwrap();
        assert_eq!(y[0].as_slice::<i8>().unwrap(), &[1, 2, 2, 2, 1, 2, 2, 2]);
        // Bad scale shape: error, not panic.
        let bad = Tensor::vector(vec![1.0f32, 2.0, 3.0]);
        assert!(q(ql(0, 0, None), &[Some(&x), Some(&bad)], 1).is_err());
        assert!(q(ql(5, 0, None), &[Some(&x), Some(&bad)], 1).is_err());
        assert!(q(ql(1, 1, None), &[Some(&x), Some(&s)], 1).is_err());
        // Empty input.
        let e = Tensor::from_vec(vec![0, 3], Vec::<f32>::new()).unwrap();
        let y = q(
            ql(1, 0, None),
            &[Some(&e), Some(&Tensor::scalar(1.0f32))],
            1,
        )
        .unwrap();
        assert_eq!(y[0].shape(), &[0, 3]);
    }

    #[test]
    fn quantize_float8() {
        let x = Tensor::vector(vec![1.0f32, 1000.0, -1e6]);
        let s = Tensor::scalar(1.0f32);
        let mut op = ql(1, 0, Some(DType::F8E4M3FN));
        let y = q(op.clone(), &[Some(&x), Some(&s)], 1).unwrap();
        assert!(y[0].data() == &TensorData::Bits(DType::F8E4M3FN, vec![0x38, 0x7E, 0xFE]));
        if let QuantOp::QuantizeLinear { saturate, .. } = &mut op {
            *saturate = false;
        }
        let y = q(op, &[Some(&x), Some(&s)], 1).unwrap();
        assert!(y[0].data() == &TensorData::Bits(DType::F8E4M3FN, vec![0x38, 0x7F, 0xFF]));
    }

    #[test]
    fn dequantize_cases() {
        let op = QuantOp::DequantizeLinear {
            axis: 1,
            block_size: 0,
            output_dtype: None,
        };
        let x = Tensor::from_vec(vec![1, 3], vec![0u8, 128, 255]).unwrap();
        let s = Tensor::scalar(0.5f32);
        let z = Tensor::scalar(128u8);
        let y = q(op.clone(), &[Some(&x), Some(&s), Some(&z)], 1).unwrap();
        assert_eq!(y[0].as_slice::<f32>().unwrap(), &[-64.0, 0.0, 63.5]);
        // Per-axis on axis 1.
        let s = Tensor::vector(vec![1.0f32, 2.0, 3.0]);
        let y = q(op.clone(), &[Some(&x), Some(&s)], 1).unwrap();
        assert_eq!(y[0].as_slice::<f32>().unwrap(), &[0.0, 256.0, 765.0]);
        // Zero point of another type: error.
        let zi = Tensor::scalar(1i8);
        assert!(q(op.clone(), &[Some(&x), Some(&s), Some(&zi)], 1).is_err());
        // int4 input, f16 scale -> f16 output.
        let x4 = Tensor::new(vec![2], TensorData::Bits(DType::I4, vec![0xF, 7])).unwrap();
        let s16 = Tensor::scalar(half::f16::from_f32(2.0));
        let y = q(op, &[Some(&x4), Some(&s16)], 1).unwrap();
        assert_eq!(
            y[0].as_slice::<half::f16>().unwrap(),
            &[half::f16::from_f32(-2.0), half::f16::from_f32(14.0)]
        );
    }

    #[test]
    fn dynamic_quantize() {
        let x = Tensor::vector(vec![0.0f32, 2.0, -3.0, 1000.0]);
        let y = q(QuantOp::DynamicQuantizeLinear, &[Some(&x)], 3).unwrap();
        let scale = (1000.0f32 + 3.0) / 255.0;
        assert_eq!(y[1].as_slice::<f32>().unwrap(), &[scale]);
        assert_eq!(y[2].as_slice::<u8>().unwrap(), &[1]);
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[1, 2, 0, 255]);
        // All zeros: scale 1/255, zero point 0.
        let z = Tensor::vector(vec![0.0f32; 3]);
        let y = q(QuantOp::DynamicQuantizeLinear, &[Some(&z)], 3).unwrap();
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[0, 0, 0]);
        assert!(q(
            QuantOp::DynamicQuantizeLinear,
            &[Some(&Tensor::vector(vec![1i32]))],
            3
        )
        .is_err());
    }

    #[test]
    fn matmul_integer_and_qlinear_matmul() {
        let a = Tensor::from_vec(vec![2, 2], vec![1u8, 2, 3, 4]).unwrap();
        let b = Tensor::from_vec(vec![2, 1], vec![5u8, 6]).unwrap();
        let az = Tensor::scalar(1u8);
        let y = q(QuantOp::MatMulInteger, &[Some(&a), Some(&b), Some(&az)], 1).unwrap();
        // [[0,1],[2,3]] @ [[5],[6]]
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[6, 28]);
        // Per-row a zero point.
        let azr = Tensor::vector(vec![1u8, 3]);
        let y = q(QuantOp::MatMulInteger, &[Some(&a), Some(&b), Some(&azr)], 1).unwrap();
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[6, 6]);
        let bad = Tensor::vector(vec![1u8, 2, 3]);
        assert!(q(QuantOp::MatMulInteger, &[Some(&a), Some(&b), Some(&bad)], 1).is_err());
        // QLinearMatMul: c = [6, 28] * (0.5 * 1 / 2) + 10 -> [11.5, 17] -> [12, 17].
        let one = Tensor::scalar(1.0f32);
        let y = q(
            QuantOp::QLinearMatMul,
            &[
                Some(&a),
                Some(&Tensor::scalar(0.5f32)),
                Some(&az),
                Some(&b),
                Some(&one),
                Some(&Tensor::scalar(0u8)),
                Some(&Tensor::scalar(2.0f32)),
                Some(&Tensor::scalar(10u8)),
            ],
            1,
        )
        .unwrap();
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[12, 17]);
    }

    #[test]
    fn bitcast_and_cast_with_attributes() {
        let x = Tensor::vector(vec![1.0f32, -0.0]);
        let y = q(QuantOp::BitCast { to: DType::I32 }, &[Some(&x)], 1).unwrap();
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[0x3F80_0000, i32::MIN]);
        let b = Tensor::vector(vec![true, false]);
        let y = q(QuantOp::BitCast { to: DType::U8 }, &[Some(&b)], 1).unwrap();
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[1, 0]);
        assert!(q(QuantOp::BitCast { to: DType::I64 }, &[Some(&x)], 1).is_err());
        let cast = |to, saturate, mode: &str| QuantOp::Cast {
            to,
            saturate,
            round_mode: mode.into(),
        };
        let big = Tensor::vector(vec![1e6f32, 3.0]);
        let y = q(cast(Some(DType::F8E5M2), false, "up"), &[Some(&big)], 1).unwrap();
        assert!(y[0].data() == &TensorData::Bits(DType::F8E5M2, vec![0x7C, 0x42]));
        let y = q(cast(Some(DType::F8E8M0), true, "down"), &[Some(&big)], 1).unwrap();
        assert!(y[0].data() == &TensorData::Bits(DType::F8E8M0, vec![146, 128]));
        // CastLike form: the target dtype comes from input 1.
        let like = Tensor::new(vec![0], TensorData::Bits(DType::F8E4M3FN, vec![])).unwrap();
        let y = q(cast(None, false, "up"), &[Some(&big), Some(&like)], 1).unwrap();
        assert!(y[0].data() == &TensorData::Bits(DType::F8E4M3FN, vec![0x7F, 0x44]));
        assert!(q(
            cast(Some(DType::F8E8M0), true, "sideways"),
            &[Some(&big)],
            1
        )
        .is_err());
    }
}
