//! Element-wise kernels: unary math, binary arithmetic / comparison / logic with
//! numpy multidirectional broadcasting, variadic Sum/Mean/Max/Min, Clip, Where
//! and Cast.
//!
//! Floating-point kernels are written once over [`FloatElem`]: f32 and f64 are
//! computed natively, f16 and bf16 are widened to f32, computed and rounded back.
//! Integer kernels use wrapping arithmetic (like ONNX Runtime); the only integer
//! failures are division by zero and `0` raised to a negative power, which are
//! reported as errors instead of panicking.

use crate::fastmath::{self, Func};
use crate::util::{broadcast_shape, strides, tensor};
use crate::{invalid, unsupported, Result};
use half::{bf16, f16};
use kiln_ir::{BinaryOp, DType, Element, Op, Tensor, TensorData, UnaryOp, VariadicOp};
use std::cell::Cell;
use std::ops::{Add, Div, Mul, Neg, Rem, Sub};
use std::sync::OnceLock;

// ---------------------------------------------------------------------------
// Broadcast iteration
// ---------------------------------------------------------------------------

/// Walks `K` operands broadcast to a common output shape, one row of the
/// innermost dimension at a time. Output dims of size 1 are dropped and
/// adjacent dims that are laid out contiguously for every operand are merged, so
/// rows are as long as possible (two equal shapes become a single row; a scalar
/// operand gets stride 0).
pub(crate) struct Plan<const K: usize> {
    /// Merged output dims (at least one).
    dims: Vec<usize>,
    /// Per merged dim, the element stride of each operand (0 when broadcast).
    strides: Vec<[usize; K]>,
    total: usize,
}

impl<const K: usize> Plan<K> {
    /// Every shape in `shapes` must broadcast to `out_shape` (numpy rules:
    /// right-aligned, each dim equal to the output's or 1).
    pub(crate) fn new(out_shape: &[usize], shapes: [&[usize]; K]) -> Self {
        let rank = out_shape.len();
        let total = out_shape.iter().product();
        let own: [Vec<usize>; K] = shapes.map(strides);
        let mut dims: Vec<usize> = Vec::new();
        let mut st: Vec<[usize; K]> = Vec::new();
        for (d, &n) in out_shape.iter().enumerate() {
            if n == 1 {
                continue;
            }
            let mut s = [0usize; K];
            for (k, sk) in s.iter_mut().enumerate() {
                let shape = shapes[k];
                if let Some(i) = (d + shape.len()).checked_sub(rank) {
                    if shape[i] != 1 {
                        *sk = own[k][i];
                    }
                }
            }
            match (dims.last_mut(), st.last_mut()) {
                (Some(pn), Some(ps)) if ps.iter().zip(&s).all(|(&p, &q)| p == q * n) => {
                    *pn *= n;
                    *ps = s;
                }
                _ => {
                    dims.push(n);
                    st.push(s);
                }
            }
        }
        if dims.is_empty() {
            dims.push(1);
            st.push([0; K]);
        }
        Plan {
            dims,
            strides: st,
            total,
        }
    }

    /// Number of output elements.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Calls `f(offsets, len, inner_strides)` for each row, in row-major output
    /// order: `offsets[k]` is operand `k`'s flat index of the row's first element
    /// and `inner_strides[k]` its step along the row (0 or 1).
    pub(crate) fn for_each_row(&self, mut f: impl FnMut([usize; K], usize, [usize; K])) {
        if self.total == 0 {
            return;
        }
        let r = self.dims.len();
        let inner = self.dims[r - 1];
        let inner_st = self.strides[r - 1];
        let outer = &self.dims[..r - 1];
        let rows = self.total / inner;
        let mut counter = vec![0usize; r - 1];
        let mut offs = [0usize; K];
        for _ in 0..rows {
            f(offs, inner, inner_st);
            for ax in (0..r - 1).rev() {
                counter[ax] += 1;
                for (o, s) in offs.iter_mut().zip(&self.strides[ax]) {
                    *o += s;
                }
                if counter[ax] < outer[ax] {
                    break;
                }
                for (o, s) in offs.iter_mut().zip(&self.strides[ax]) {
                    *o -= s * counter[ax];
                }
                counter[ax] = 0;
            }
        }
    }
}

/// The shapes of a binary op's operands and of its (broadcast) result.
#[derive(Clone, Copy)]
struct Shapes<'a> {
    a: &'a [usize],
    b: &'a [usize],
    out: &'a [usize],
}

impl Shapes<'_> {
    /// `f` applied to every broadcast pair, in row-major output order.
    fn zip<A, B, O>(&self, a: &[A], b: &[B], f: impl Fn(&A, &B) -> O) -> Vec<O> {
        if self.a == self.b {
            return a.iter().zip(b).map(|(x, y)| f(x, y)).collect();
        }
        let plan = Plan::new(self.out, [self.a, self.b]);
        let mut out = Vec::with_capacity(plan.total());
        plan.for_each_row(|[oa, ob], n, [sa, sb]| match (sa, sb) {
            (1, 1) => out.extend(
                a[oa..oa + n]
                    .iter()
                    .zip(&b[ob..ob + n])
                    .map(|(x, y)| f(x, y)),
            ),
            (0, 1) => {
                let x = &a[oa];
                out.extend(b[ob..ob + n].iter().map(|y| f(x, y)));
            }
            (1, 0) => {
                let y = &b[ob];
                out.extend(a[oa..oa + n].iter().map(|x| f(x, y)));
            }
            _ => out.extend((0..n).map(|i| f(&a[oa + i * sa], &b[ob + i * sb]))),
        });
        out
    }
}

/// `f` applied to every broadcast triple (used by Where).
fn zip3<A, B, C, O>(
    (a, ash): (&[A], &[usize]),
    (b, bsh): (&[B], &[usize]),
    (c, csh): (&[C], &[usize]),
    out_shape: &[usize],
    f: impl Fn(&A, &B, &C) -> O,
) -> Vec<O> {
    let plan = Plan::new(out_shape, [ash, bsh, csh]);
    let mut out = Vec::with_capacity(plan.total());
    plan.for_each_row(|[oa, ob, oc], n, [sa, sb, sc]| {
        if (sa, sb, sc) == (1, 1, 1) {
            let rows = a[oa..oa + n].iter().zip(&b[ob..ob + n]).zip(&c[oc..oc + n]);
            out.extend(rows.map(|((x, y), z)| f(x, y, z)));
        } else {
            out.extend((0..n).map(|i| f(&a[oa + i * sa], &b[ob + i * sb], &c[oc + i * sc])));
        }
    });
    out
}

/// `cond ? x : y` element-wise over a three-way broadcast.
fn select<T: Element>(
    cond: (&[bool], &[usize]),
    (x, xs): (&[T], &[usize]),
    (y, ys): (&[T], &[usize]),
    out: &[usize],
) -> TensorData {
    let v = zip3(cond, (x, xs), (y, ys), out, |&k, p, q| {
        if k {
            p.clone()
        } else {
            q.clone()
        }
    });
    T::wrap(v)
}

/// Matches two buffers of the same variant, binding their `Vec`s.
macro_rules! same_pair {
    ($a:expr, $b:expr, |$x:ident, $y:ident| $body:expr, _ => $other:expr) => {
        match ($a, $b) {
            (TensorData::F32($x), TensorData::F32($y)) => $body,
            (TensorData::F64($x), TensorData::F64($y)) => $body,
            (TensorData::F16($x), TensorData::F16($y)) => $body,
            (TensorData::BF16($x), TensorData::BF16($y)) => $body,
            (TensorData::I8($x), TensorData::I8($y)) => $body,
            (TensorData::I16($x), TensorData::I16($y)) => $body,
            (TensorData::I32($x), TensorData::I32($y)) => $body,
            (TensorData::I64($x), TensorData::I64($y)) => $body,
            (TensorData::U8($x), TensorData::U8($y)) => $body,
            (TensorData::U16($x), TensorData::U16($y)) => $body,
            (TensorData::U32($x), TensorData::U32($y)) => $body,
            (TensorData::U64($x), TensorData::U64($y)) => $body,
            (TensorData::Bool($x), TensorData::Bool($y)) => $body,
            (TensorData::String($x), TensorData::String($y)) => $body,
            _ => $other,
        }
    };
}

// ---------------------------------------------------------------------------
// Element traits
// ---------------------------------------------------------------------------

/// A native floating-point compute type (f32 or f64).
pub(crate) trait Real:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Rem<Output = Self>
    + Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    /// A constant (rounded to this type).
    fn c(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn ln_1p(self) -> Self;
    fn exp_m1(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn tan(self) -> Self;
    fn asin(self) -> Self;
    fn acos(self) -> Self;
    fn atan(self) -> Self;
    fn sinh(self) -> Self;
    fn cosh(self) -> Self;
    fn asinh(self) -> Self;
    fn acosh(self) -> Self;
    fn atanh(self) -> Self;
    fn abs(self) -> Self;
    fn floor(self) -> Self;
    fn ceil(self) -> Self;
    fn round_ties_even(self) -> Self;
    fn is_nan(self) -> bool;
    fn is_infinite(self) -> bool;
    fn powf(self, e: Self) -> Self;
    fn copysign(self, sign: Self) -> Self;
}

macro_rules! impl_real {
    ($t:ident) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn c(v: f64) -> Self {
                v as $t
            }
            #[allow(clippy::unnecessary_cast)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            impl_real!(@fwd $t: exp ln ln_1p exp_m1 sqrt tanh sin cos tan asin acos atan
                sinh cosh asinh acosh atanh abs floor ceil round_ties_even);
            fn is_nan(self) -> bool {
                $t::is_nan(self)
            }
            fn is_infinite(self) -> bool {
                $t::is_infinite(self)
            }
            fn powf(self, e: Self) -> Self {
                $t::powf(self, e)
            }
            fn copysign(self, sign: Self) -> Self {
                $t::copysign(self, sign)
            }
        }
    };
    (@fwd $t:ident: $($m:ident)*) => {
        $(fn $m(self) -> Self { $t::$m(self) })*
    };
}
impl_real!(f32);
impl_real!(f64);

/// A floating-point tensor element with the type it is computed in.
pub(crate) trait FloatElem: Element + Copy {
    type C: Real;
    fn up(self) -> Self::C;
    fn down(v: Self::C) -> Self;
    /// Rounds an f64 straight to this type.
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64 {
        self.up().to_f64()
    }
}

impl FloatElem for f32 {
    type C = f32;
    fn up(self) -> f32 {
        self
    }
    fn down(v: f32) -> f32 {
        v
    }
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
}

impl FloatElem for f64 {
    type C = f64;
    fn up(self) -> f64 {
        self
    }
    fn down(v: f64) -> f64 {
        v
    }
    fn from_f64(v: f64) -> f64 {
        v
    }
}

impl FloatElem for f16 {
    type C = f32;
    fn up(self) -> f32 {
        self.to_f32()
    }
    fn down(v: f32) -> f16 {
        f16::from_f32(v)
    }
    fn from_f64(v: f64) -> f16 {
        f16::from_f64(v)
    }
}

impl FloatElem for bf16 {
    type C = f32;
    fn up(self) -> f32 {
        self.to_f32()
    }
    fn down(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
    fn from_f64(v: f64) -> bf16 {
        bf16::from_f64(v)
    }
}

/// An integer tensor element. Arithmetic wraps.
pub(crate) trait IntElem: Element + Copy + Ord {
    const SIGNED: bool;
    const ZERO: Self;
    const ONE: Self;
    const MIN: Self;
    const MAX: Self;
    fn wadd(self, o: Self) -> Self;
    fn wsub(self, o: Self) -> Self;
    fn wmul(self, o: Self) -> Self;
    /// Wrapping division; the divisor must not be zero.
    fn wdiv(self, o: Self) -> Self;
    /// Wrapping C remainder (sign of the dividend); the divisor must not be zero.
    fn wrem(self, o: Self) -> Self;
    fn wneg(self) -> Self;
    fn is_neg(self) -> bool;
    fn bnot(self) -> Self;
    fn band(self, o: Self) -> Self;
    fn bor(self, o: Self) -> Self;
    fn bxor(self, o: Self) -> Self;
    /// Shift left by `by` bits, dropping bits shifted out; shifting by a negative
    /// amount or the bit width or more gives 0.
    fn shl(self, by: Self) -> Self;
    /// Shift right by `by` bits (arithmetic for signed types); shifting by a
    /// negative amount or the bit width or more gives 0 (-1 for negative values).
    fn shr(self, by: Self) -> Self;
    fn to_i128(self) -> i128;
    /// Truncating (wrapping) conversion.
    fn from_i128(v: i128) -> Self;
    fn to_f64(self) -> f64;
    /// Truncating, saturating conversion (NaN gives 0), like Rust `as`.
    fn from_f64(v: f64) -> Self;
}

macro_rules! impl_int {
    ($($t:ident),*) => {$(
        impl IntElem for $t {
            const SIGNED: bool = $t::MIN != 0;
            const ZERO: Self = 0;
            const ONE: Self = 1;
            const MIN: Self = $t::MIN;
            const MAX: Self = $t::MAX;
            fn wadd(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            fn wsub(self, o: Self) -> Self {
                self.wrapping_sub(o)
            }
            fn wmul(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            fn wdiv(self, o: Self) -> Self {
                self.wrapping_div(o)
            }
            fn wrem(self, o: Self) -> Self {
                self.wrapping_rem(o)
            }
            fn wneg(self) -> Self {
                self.wrapping_neg()
            }
            fn is_neg(self) -> bool {
                (self as i128) < 0
            }
            fn bnot(self) -> Self {
                !self
            }
            fn band(self, o: Self) -> Self {
                self & o
            }
            fn bor(self, o: Self) -> Self {
                self | o
            }
            fn bxor(self, o: Self) -> Self {
                self ^ o
            }
            fn shl(self, by: Self) -> Self {
                u32::try_from(by as i128).ok().and_then(|n| self.checked_shl(n)).unwrap_or(0)
            }
            fn shr(self, by: Self) -> Self {
                // Out-of-range shifts give the sign fill: 0, or -1 for negative values.
                let fill = (if (self as i128) < 0 { -1i128 } else { 0 }) as $t;
                u32::try_from(by as i128).ok().and_then(|n| self.checked_shr(n)).unwrap_or(fill)
            }
            fn to_i128(self) -> i128 {
                self as i128
            }
            fn from_i128(v: i128) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    )*};
}
impl_int!(i8, i16, i32, i64, u8, u16, u32, u64);

// ---------------------------------------------------------------------------
// erf
// ---------------------------------------------------------------------------

/// erf by its everywhere-convergent series of positive terms,
/// `erf(x) = 2/sqrt(pi) * x * exp(-x^2) * sum_n (2x^2)^n / (1*3*...*(2n+1))`.
/// Accurate to about 1e-16 for `0 <= x <= 1`; slow. Part of [`erf_reference`].
fn erf_series(x: f64) -> f64 {
    let xx = x * x;
    let t = 2.0 * xx;
    let (mut term, mut sum, mut k) = (1.0f64, 1.0f64, 1.0f64);
    loop {
        k += 2.0;
        term *= t / k;
        sum += term;
        if term <= sum * 1e-17 {
            break;
        }
    }
    std::f64::consts::FRAC_2_SQRT_PI * x * (-xx).exp() * sum
}

/// erfc by its continued fraction
/// `erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))`,
/// evaluated backwards from 300 terms (converged to f64 precision for x >= 1).
fn erfc_cont_frac(x: f64) -> f64 {
    let mut f = x;
    for n in (1..=300).rev() {
        f = x + (n as f64 / 2.0) / f;
    }
    (-x * x).exp() / (std::f64::consts::PI.sqrt() * f)
}

/// Slow but accurate erf for `x >= 0`: builds the fast table and is the test
/// reference.
fn erf_reference(x: f64) -> f64 {
    if x < 1.0 {
        erf_series(x)
    } else {
        1.0 - erfc_cont_frac(x)
    }
}

/// Below this, erf uses its Maclaurin series.
const ERF_SMALL: f64 = 0.5;
/// From here on, erf(x) rounds to 1 in f64 (erfc(6) < 2.2e-17).
const ERF_ONE: f64 = 6.0;
const ERF_STEP: f64 = 0.125;
const ERF_PIECES: usize = 44; // (ERF_ONE - ERF_SMALL) / ERF_STEP
const ERF_DEG: usize = 13; // Taylor coefficients per piece

/// Maclaurin coefficients (-1)^n / (n! (2n+1)), n = 0..12.
const ERF_TAYLOR: [f64; 13] = [
    1.0,
    -1.0 / 3.0,
    1.0 / (2.0 * 5.0),
    -1.0 / (6.0 * 7.0),
    1.0 / (24.0 * 9.0),
    -1.0 / (120.0 * 11.0),
    1.0 / (720.0 * 13.0),
    -1.0 / (5040.0 * 15.0),
    1.0 / (40320.0 * 17.0),
    -1.0 / (362880.0 * 19.0),
    1.0 / (3628800.0 * 21.0),
    -1.0 / (39916800.0 * 23.0),
    1.0 / (479001600.0 * 25.0),
];

/// Degree-12 Taylor polynomials of erf about the midpoints of
/// `[0.5 + i/8, 0.625 + i/8]`, built once: the constant term from
/// [`erf_reference`], the others from the derivatives
/// `erf^(k)(m) = 2/sqrt(pi) * (-1)^(k-1) * H_(k-1)(m) * exp(-m^2)` (physicists'
/// Hermite polynomials). Truncation error < 1e-19 on each piece.
fn erf_table() -> &'static [[f64; ERF_DEG]; ERF_PIECES] {
    static TABLE: OnceLock<[[f64; ERF_DEG]; ERF_PIECES]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [[0.0; ERF_DEG]; ERF_PIECES];
        for (i, coef) in table.iter_mut().enumerate() {
            let m = ERF_SMALL + ERF_STEP * (i as f64 + 0.5);
            coef[0] = erf_reference(m);
            let scale = std::f64::consts::FRAC_2_SQRT_PI * (-m * m).exp();
            // h = H_(k-1)(m), h_prev = H_(k-2)(m); fact = k!.
            let (mut h_prev, mut h, mut fact) = (0.0f64, 1.0f64, 1.0f64);
            for (k, c) in coef.iter_mut().enumerate().skip(1) {
                fact *= k as f64;
                let sign = if k % 2 == 1 { 1.0 } else { -1.0 };
                *c = scale * sign * h / fact;
                let next = 2.0 * m * h - 2.0 * (k - 1) as f64 * h_prev;
                h_prev = h;
                h = next;
            }
        }
        table
    })
}

/// The error function in f64 (within ~2 ulp; f32 results rounded from it are
/// essentially correctly rounded).
pub(crate) fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < ERF_SMALL {
        let u = a * a;
        let p = ERF_TAYLOR.iter().rev().fold(0.0, |acc, &c| acc * u + c);
        std::f64::consts::FRAC_2_SQRT_PI * a * p
    } else if a >= ERF_ONE {
        1.0
    } else {
        let i = (((a - ERF_SMALL) / ERF_STEP) as usize).min(ERF_PIECES - 1);
        let mid = ERF_SMALL + ERF_STEP * (i as f64 + 0.5);
        let h = a - mid;
        erf_table()[i].iter().rev().fold(0.0, |acc, &c| acc * h + c)
    };
    r.copysign(x)
}

fn gelu_erf(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

fn gelu_tanh(x: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
}

/// ln(1 + e^x) without overflow.
fn softplus<T: Real>(v: T) -> T {
    if v > T::ZERO {
        v + (-v).exp().ln_1p()
    } else {
        v.exp().ln_1p()
    }
}

/// Clamps to [0, 1], letting NaN through.
fn clamp01<T: Real>(v: T) -> T {
    if v < T::ZERO {
        T::ZERO
    } else if v > T::ONE {
        T::ONE
    } else {
        v
    }
}

// ---------------------------------------------------------------------------
// Unary
// ---------------------------------------------------------------------------

fn unary_name(op: &UnaryOp) -> &'static str {
    Op::Unary(op.clone()).name()
}

/// `f` on every element, computed in `S::C`.
fn fmap<S: FloatElem>(x: &[S], f: impl Fn(S::C) -> S::C) -> TensorData {
    S::wrap(x.iter().map(|&v| S::down(f(v.up()))).collect())
}

fn unary_float<S: FloatElem>(op: &UnaryOp, x: &[S]) -> Option<TensorData> {
    let zero = <S::C as Real>::ZERO;
    let one = <S::C as Real>::ONE;
    let c = |v: f32| <S::C as Real>::c(v as f64);
    Some(match *op {
        UnaryOp::Relu => fmap(x, |v| if v < zero { zero } else { v }),
        UnaryOp::Sigmoid => fmap(x, |v| {
            if v >= zero {
                one / (one + (-v).exp())
            } else {
                let e = v.exp();
                e / (one + e)
            }
        }),
        UnaryOp::Tanh => fmap(x, |v| v.tanh()),
        UnaryOp::Erf => fmap(x, |v| <S::C as Real>::c(erf(v.to_f64()))),
        UnaryOp::Sqrt => fmap(x, |v| v.sqrt()),
        UnaryOp::Reciprocal => fmap(x, |v| one / v),
        UnaryOp::Exp => fmap(x, |v| v.exp()),
        UnaryOp::Log => fmap(x, |v| v.ln()),
        UnaryOp::Neg => fmap(x, |v| -v),
        UnaryOp::Abs => fmap(x, |v| v.abs()),
        UnaryOp::Floor => fmap(x, |v| v.floor()),
        UnaryOp::Ceil => fmap(x, |v| v.ceil()),
        UnaryOp::Round => fmap(x, |v| v.round_ties_even()),
        UnaryOp::Sign => fmap(x, |v| {
            if v > zero {
                one
            } else if v < zero {
                -one
            } else {
                v
            }
        }),
        UnaryOp::Sin => fmap(x, |v| v.sin()),
        UnaryOp::Cos => fmap(x, |v| v.cos()),
        UnaryOp::Tan => fmap(x, |v| v.tan()),
        UnaryOp::Asin => fmap(x, |v| v.asin()),
        UnaryOp::Acos => fmap(x, |v| v.acos()),
        UnaryOp::Atan => fmap(x, |v| v.atan()),
        UnaryOp::Sinh => fmap(x, |v| v.sinh()),
        UnaryOp::Cosh => fmap(x, |v| v.cosh()),
        UnaryOp::Asinh => fmap(x, |v| v.asinh()),
        UnaryOp::Acosh => fmap(x, |v| v.acosh()),
        UnaryOp::Atanh => fmap(x, |v| v.atanh()),
        UnaryOp::Softplus => fmap(x, softplus),
        UnaryOp::Softsign => fmap(x, |v| v / (one + v.abs())),
        UnaryOp::HardSwish => {
            let (alpha, beta) = (<S::C as Real>::c(1.0 / 6.0), <S::C as Real>::c(0.5));
            fmap(x, |v| v * clamp01(alpha * v + beta))
        }
        UnaryOp::Mish => fmap(x, |v| v * softplus(v).tanh()),
        UnaryOp::IsNaN => TensorData::Bool(x.iter().map(|v| v.up().is_nan()).collect()),
        UnaryOp::IsInf {
            detect_positive,
            detect_negative,
        } => TensorData::Bool(
            x.iter()
                .map(|v| {
                    let v = v.up();
                    v.is_infinite()
                        && if v > zero {
                            detect_positive
                        } else {
                            detect_negative
                        }
                })
                .collect(),
        ),
        UnaryOp::LeakyRelu { alpha } => {
            let a = c(alpha);
            fmap(x, |v| if v < zero { a * v } else { v })
        }
        UnaryOp::HardSigmoid { alpha, beta } => {
            let (a, b) = (c(alpha), c(beta));
            fmap(x, |v| clamp01(a * v + b))
        }
        UnaryOp::Elu { alpha } => {
            let a = c(alpha);
            fmap(x, |v| if v < zero { a * v.exp_m1() } else { v })
        }
        UnaryOp::Selu { alpha, gamma } => {
            let (a, g) = (c(alpha), c(gamma));
            fmap(x, |v| {
                if v > zero {
                    g * v
                } else {
                    g * (a * v.exp() - a)
                }
            })
        }
        UnaryOp::Celu { alpha } => {
            let a = c(alpha);
            fmap(x, |v| if v > zero { v } else { a * (v / a).exp_m1() })
        }
        UnaryOp::ThresholdedRelu { alpha } => {
            let a = c(alpha);
            fmap(x, |v| if v > a { v } else { zero })
        }
        // Computed in f64 so that 1 + erf(..) does not cancel catastrophically
        // for negative inputs.
        UnaryOp::Gelu { tanh_approx: false } => {
            fmap(x, |v| <S::C as Real>::c(gelu_erf(v.to_f64())))
        }
        UnaryOp::Gelu { tanh_approx: true } => {
            fmap(x, |v| <S::C as Real>::c(gelu_tanh(v.to_f64())))
        }
        UnaryOp::Not | UnaryOp::BitwiseNot => return None,
    })
}

fn imap<I: IntElem>(x: &[I], f: impl Fn(I) -> I) -> TensorData {
    I::wrap(x.iter().map(|&v| f(v)).collect())
}

fn unary_int<I: IntElem>(op: &UnaryOp, x: &[I]) -> Option<TensorData> {
    Some(match op {
        UnaryOp::Neg if I::SIGNED => imap(x, |v| v.wneg()),
        UnaryOp::Abs => imap(x, |v| if v.is_neg() { v.wneg() } else { v }),
        UnaryOp::Sign => imap(x, |v| {
            if v.is_neg() {
                I::ONE.wneg()
            } else if v == I::ZERO {
                I::ZERO
            } else {
                I::ONE
            }
        }),
        UnaryOp::Relu if I::SIGNED => imap(x, |v| if v.is_neg() { I::ZERO } else { v }),
        UnaryOp::BitwiseNot => imap(x, |v| v.bnot()),
        _ => return None,
    })
}

/// One-input element-wise op. Floats support every op except Not/BitwiseNot;
/// signed ints support Neg, Abs, Sign, Relu, BitwiseNot; unsigned ints Abs,
/// Sign, BitwiseNot; bool only Not.
pub fn unary(op: &UnaryOp, x: &Tensor) -> Result<Tensor> {
    if let (TensorData::F32(v), Some(func)) = (x.data(), fast_unary_func(op)) {
        return tensor(
            x.shape().to_vec(),
            TensorData::F32(fastmath::map_vec(func, v)),
        );
    }
    unary_reference(op, x)
}

/// The fast f32 version of a unary op, where `fastmath` has one (within a few
/// ulp of the reference; see `fastmath`'s table).
fn fast_unary_func(op: &UnaryOp) -> Option<Func> {
    Some(match *op {
        UnaryOp::Relu => Func::Relu,
        UnaryOp::Sigmoid => Func::Sigmoid,
        UnaryOp::Tanh => Func::Tanh,
        UnaryOp::Erf => Func::Erf,
        UnaryOp::Exp => Func::Exp,
        UnaryOp::HardSwish => Func::HardSwish,
        UnaryOp::LeakyRelu { alpha } => Func::LeakyRelu { alpha },
        UnaryOp::HardSigmoid { alpha, beta } => Func::HardSigmoid { alpha, beta },
        UnaryOp::Gelu { tanh_approx: false } => Func::GeluErf,
        UnaryOp::Gelu { tanh_approx: true } => Func::GeluTanh,
        _ => return None,
    })
}

/// The plain kernel of every unary op (the reference for the fast paths).
fn unary_reference(op: &UnaryOp, x: &Tensor) -> Result<Tensor> {
    let data = match x.data() {
        TensorData::F32(v) => unary_float(op, v),
        TensorData::F64(v) => unary_float(op, v),
        TensorData::F16(v) => unary_float(op, v),
        TensorData::BF16(v) => unary_float(op, v),
        TensorData::I8(v) => unary_int(op, v),
        TensorData::I16(v) => unary_int(op, v),
        TensorData::I32(v) => unary_int(op, v),
        TensorData::I64(v) => unary_int(op, v),
        TensorData::U8(v) => unary_int(op, v),
        TensorData::U16(v) => unary_int(op, v),
        TensorData::U32(v) => unary_int(op, v),
        TensorData::U64(v) => unary_int(op, v),
        TensorData::Bool(v) if *op == UnaryOp::Not => {
            Some(TensorData::Bool(v.iter().map(|b| !b).collect()))
        }
        TensorData::Bool(_) | TensorData::String(_) | TensorData::Bits(..) => None,
    }
    .ok_or_else(|| unsupported!("{} on {} tensors", unary_name(op), x.dtype()))?;
    tensor(x.shape().to_vec(), data)
}

// ---------------------------------------------------------------------------
// Binary
// ---------------------------------------------------------------------------

fn farith<S: FloatElem>(
    sh: Shapes,
    x: &[S],
    y: &[S],
    f: impl Fn(S::C, S::C) -> S::C,
) -> TensorData {
    S::wrap(sh.zip(x, y, |p, q| S::down(f(p.up(), q.up()))))
}

fn fcmp<S: FloatElem>(sh: Shapes, x: &[S], y: &[S], f: impl Fn(S::C, S::C) -> bool) -> TensorData {
    TensorData::Bool(sh.zip(x, y, |p, q| f(p.up(), q.up())))
}

/// Python / numpy float modulo: the result takes the sign of the divisor.
fn py_fmod<T: Real>(p: T, q: T) -> T {
    let r = p % q;
    if r == T::ZERO {
        r.copysign(q)
    } else if (r < T::ZERO) != (q < T::ZERO) {
        r + q
    } else {
        r
    }
}

fn float_binary<S: FloatElem>(op: BinaryOp, x: &[S], y: &[S], sh: Shapes) -> Option<TensorData> {
    let zero = <S::C as Real>::ZERO;
    Some(match op {
        BinaryOp::Add => farith(sh, x, y, |p, q| p + q),
        BinaryOp::Sub => farith(sh, x, y, |p, q| p - q),
        BinaryOp::Mul => farith(sh, x, y, |p, q| p * q),
        BinaryOp::Div => farith(sh, x, y, |p, q| p / q),
        BinaryOp::Pow => farith(sh, x, y, |p, q| p.powf(q)),
        BinaryOp::Mod { fmod: true } => farith(sh, x, y, |p, q| p % q),
        // The spec requires fmod=1 for floats; numpy semantics are used otherwise.
        BinaryOp::Mod { fmod: false } => farith(sh, x, y, py_fmod),
        // NaN propagates (p + q is NaN when either is).
        BinaryOp::Max => farith(sh, x, y, |p, q| {
            if p.is_nan() || q.is_nan() {
                p + q
            } else if p >= q {
                p
            } else {
                q
            }
        }),
        BinaryOp::Min => farith(sh, x, y, |p, q| {
            if p.is_nan() || q.is_nan() {
                p + q
            } else if p <= q {
                p
            } else {
                q
            }
        }),
        BinaryOp::PRelu => farith(sh, x, y, |p, s| if p < zero { s * p } else { p }),
        BinaryOp::Equal => fcmp(sh, x, y, |p, q| p == q),
        BinaryOp::Less => fcmp(sh, x, y, |p, q| p < q),
        BinaryOp::LessOrEqual => fcmp(sh, x, y, |p, q| p <= q),
        BinaryOp::Greater => fcmp(sh, x, y, |p, q| p > q),
        BinaryOp::GreaterOrEqual => fcmp(sh, x, y, |p, q| p >= q),
        BinaryOp::And
        | BinaryOp::Or
        | BinaryOp::Xor
        | BinaryOp::BitShiftLeft
        | BinaryOp::BitShiftRight
        | BinaryOp::BitwiseAnd
        | BinaryOp::BitwiseOr
        | BinaryOp::BitwiseXor => return None,
    })
}

fn iarith<I: IntElem>(sh: Shapes, x: &[I], y: &[I], f: impl Fn(I, I) -> I) -> TensorData {
    I::wrap(sh.zip(x, y, |&p, &q| f(p, q)))
}

fn icmp<I: IntElem>(sh: Shapes, x: &[I], y: &[I], f: impl Fn(I, I) -> bool) -> TensorData {
    TensorData::Bool(sh.zip(x, y, |&p, &q| f(p, q)))
}

/// `base^exp` with wrapping multiplication. Negative exponents give the
/// truncated real result (0 unless |base| is 1); `0^negative` sets `bad`.
fn ipow<I: IntElem>(base: I, exp: i128, bad: &Cell<bool>) -> I {
    if exp < 0 {
        return if base == I::ONE {
            I::ONE
        } else if I::SIGNED && base == I::ONE.wneg() {
            if exp % 2 == 0 {
                I::ONE
            } else {
                base
            }
        } else {
            if base == I::ZERO {
                bad.set(true);
            }
            I::ZERO
        };
    }
    let mut e = exp.unsigned_abs();
    let (mut acc, mut b) = (I::ONE, base);
    while e > 0 {
        if e & 1 == 1 {
            acc = acc.wmul(b);
        }
        e >>= 1;
        if e > 0 {
            b = b.wmul(b);
        }
    }
    acc
}

fn int_binary<I: IntElem>(
    op: BinaryOp,
    x: &[I],
    y: &[I],
    sh: Shapes,
    name: &str,
) -> Result<Option<TensorData>> {
    let bad = Cell::new(false);
    let data = match op {
        BinaryOp::Add => iarith(sh, x, y, |p, q| p.wadd(q)),
        BinaryOp::Sub => iarith(sh, x, y, |p, q| p.wsub(q)),
        BinaryOp::Mul => iarith(sh, x, y, |p, q| p.wmul(q)),
        BinaryOp::Div => iarith(sh, x, y, |p, q| {
            if q == I::ZERO {
                bad.set(true);
                I::ZERO
            } else {
                p.wdiv(q)
            }
        }),
        BinaryOp::Mod { fmod } => iarith(sh, x, y, |p, q| {
            if q == I::ZERO {
                bad.set(true);
                return I::ZERO;
            }
            let r = p.wrem(q);
            if !fmod && r != I::ZERO && r.is_neg() != q.is_neg() {
                r.wadd(q)
            } else {
                r
            }
        }),
        BinaryOp::Pow => iarith(sh, x, y, |p, q| ipow(p, q.to_i128(), &bad)),
        BinaryOp::Max => iarith(sh, x, y, |p, q| p.max(q)),
        BinaryOp::Min => iarith(sh, x, y, |p, q| p.min(q)),
        BinaryOp::PRelu => iarith(sh, x, y, |p, s| if p.is_neg() { s.wmul(p) } else { p }),
        BinaryOp::Equal => icmp(sh, x, y, |p, q| p == q),
        BinaryOp::Less => icmp(sh, x, y, |p, q| p < q),
        BinaryOp::LessOrEqual => icmp(sh, x, y, |p, q| p <= q),
        BinaryOp::Greater => icmp(sh, x, y, |p, q| p > q),
        BinaryOp::GreaterOrEqual => icmp(sh, x, y, |p, q| p >= q),
        BinaryOp::BitShiftLeft => iarith(sh, x, y, |p, q| p.shl(q)),
        BinaryOp::BitShiftRight => iarith(sh, x, y, |p, q| p.shr(q)),
        BinaryOp::BitwiseAnd => iarith(sh, x, y, |p, q| p.band(q)),
        BinaryOp::BitwiseOr => iarith(sh, x, y, |p, q| p.bor(q)),
        BinaryOp::BitwiseXor => iarith(sh, x, y, |p, q| p.bxor(q)),
        BinaryOp::And | BinaryOp::Or | BinaryOp::Xor => return Ok(None),
    };
    if bad.get() {
        return Err(if op == BinaryOp::Pow {
            invalid!("{name}: 0 cannot be raised to a negative integer power")
        } else {
            invalid!("{name}: integer division by zero")
        });
    }
    Ok(Some(data))
}

fn bool_binary(op: BinaryOp, x: &[bool], y: &[bool], sh: Shapes) -> Option<TensorData> {
    let f: fn(&bool, &bool) -> bool = match op {
        BinaryOp::And => |p, q| *p && *q,
        BinaryOp::Or => |p, q| *p || *q,
        BinaryOp::Xor | BinaryOp::BitwiseXor => |p, q| p != q,
        BinaryOp::Equal => |p, q| p == q,
        _ => return None,
    };
    Some(TensorData::Bool(sh.zip(x, y, f)))
}

/// Pow: the exponent may have any numeric dtype; the result has the base's.
fn pow(a: &Tensor, b: &Tensor, sh: Shapes, name: &str) -> Result<TensorData> {
    fn float_base<S: FloatElem>(x: &[S], e: &Tensor, sh: Shapes) -> Result<TensorData> {
        if let Some(y) = e.as_slice::<S>() {
            if y.len() == 1 && sh.out == sh.a && y[0].to_f64() == 2.0 {
                return Ok(S::wrap(
                    x.iter()
                        .map(|&p| {
                            let v = p.up();
                            S::down(v * v)
                        })
                        .collect(),
                ));
            }
            return Ok(farith(sh, x, y, |p, q| p.powf(q)));
        }
        let y = e
            .to_f64_vec()
            .map_err(|err| invalid!("Pow exponent: {err}"))?;
        Ok(S::wrap(
            sh.zip(x, &y, |p, q| S::from_f64(p.to_f64().powf(*q))),
        ))
    }
    fn int_base<I: IntElem>(x: &[I], e: &Tensor, sh: Shapes, name: &str) -> Result<TensorData> {
        let exps: Option<Vec<i128>> = match e.data() {
            TensorData::I8(v) => Some(v.iter().map(|&q| q.into()).collect()),
            TensorData::I16(v) => Some(v.iter().map(|&q| q.into()).collect()),
            TensorData::I32(v) => Some(v.iter().map(|&q| q.into()).collect()),
            TensorData::I64(v) => Some(v.iter().map(|&q| q.into()).collect()),
            TensorData::U8(v) => Some(v.iter().map(|&q| q.into()).collect()),
            TensorData::U16(v) => Some(v.iter().map(|&q| q.into()).collect()),
            TensorData::U32(v) => Some(v.iter().map(|&q| q.into()).collect()),
            TensorData::U64(v) => Some(v.iter().map(|&q| q.into()).collect()),
            _ => None,
        };
        match exps {
            Some(y) => {
                let bad = Cell::new(false);
                let out = sh.zip(x, &y, |&p, &q| ipow(p, q, &bad));
                if bad.get() {
                    return Err(invalid!(
                        "{name}: 0 cannot be raised to a negative integer power"
                    ));
                }
                Ok(I::wrap(out))
            }
            None => {
                let y = e
                    .to_f64_vec()
                    .map_err(|err| invalid!("{name} exponent: {err}"))?;
                Ok(I::wrap(
                    sh.zip(x, &y, |p, q| I::from_f64(p.to_f64().powf(*q))),
                ))
            }
        }
    }
    if !b.dtype().is_numeric() {
        return Err(unsupported!(
            "{name} with a {} exponent (expected a numeric type)",
            b.dtype()
        ));
    }
    match a.data() {
        TensorData::F32(x) => float_base(x, b, sh),
        TensorData::F64(x) => float_base(x, b, sh),
        TensorData::F16(x) => float_base(x, b, sh),
        TensorData::BF16(x) => float_base(x, b, sh),
        TensorData::I8(x) => int_base(x, b, sh, name),
        TensorData::I16(x) => int_base(x, b, sh, name),
        TensorData::I32(x) => int_base(x, b, sh, name),
        TensorData::I64(x) => int_base(x, b, sh, name),
        TensorData::U8(x) => int_base(x, b, sh, name),
        TensorData::U16(x) => int_base(x, b, sh, name),
        TensorData::U32(x) => int_base(x, b, sh, name),
        TensorData::U64(x) => int_base(x, b, sh, name),
        TensorData::Bool(_) | TensorData::String(_) | TensorData::Bits(..) => {
            Err(unsupported!("{name} on {} tensors", a.dtype()))
        }
    }
}

/// Two-input element-wise op with numpy broadcasting. Both inputs must share a
/// dtype (except Pow, whose exponent may be any numeric type). Comparisons and
/// logic ops return bool.
pub fn binary(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary_named(op, a, b, Op::Binary(op).name())
}

fn binary_named(op: BinaryOp, a: &Tensor, b: &Tensor, name: &str) -> Result<Tensor> {
    let out_shape = broadcast_shape(a.shape(), b.shape()).map_err(|e| invalid!("{name}: {e}"))?;
    let sh = Shapes {
        a: a.shape(),
        b: b.shape(),
        out: &out_shape,
    };
    let data = if op == BinaryOp::Pow {
        pow(a, b, sh, name)?
    } else {
        if a.dtype() != b.dtype() {
            return Err(invalid!(
                "{name}: both inputs must have the same dtype, got {} and {}",
                a.dtype(),
                b.dtype()
            ));
        }
        // Big outputs: the vectorized, threaded loops (bitwise the same
        // results). Small ones stay on the reference's loops, which cost
        // less per call.
        if sh.out.iter().product::<usize>() >= fastmath::PAR_MIN {
            if let Some(d) = fast_binary(op, a.data(), b.data(), sh) {
                return tensor(out_shape, d);
            }
        }
        let data = match (a.data(), b.data()) {
            (TensorData::F32(x), TensorData::F32(y)) => float_binary(op, x, y, sh),
            (TensorData::F64(x), TensorData::F64(y)) => float_binary(op, x, y, sh),
            (TensorData::F16(x), TensorData::F16(y)) => float_binary(op, x, y, sh),
            (TensorData::BF16(x), TensorData::BF16(y)) => float_binary(op, x, y, sh),
            (TensorData::I8(x), TensorData::I8(y)) => int_binary(op, x, y, sh, name)?,
            (TensorData::I16(x), TensorData::I16(y)) => int_binary(op, x, y, sh, name)?,
            (TensorData::I32(x), TensorData::I32(y)) => int_binary(op, x, y, sh, name)?,
            (TensorData::I64(x), TensorData::I64(y)) => int_binary(op, x, y, sh, name)?,
            (TensorData::U8(x), TensorData::U8(y)) => int_binary(op, x, y, sh, name)?,
            (TensorData::U16(x), TensorData::U16(y)) => int_binary(op, x, y, sh, name)?,
            (TensorData::U32(x), TensorData::U32(y)) => int_binary(op, x, y, sh, name)?,
            (TensorData::U64(x), TensorData::U64(y)) => int_binary(op, x, y, sh, name)?,
            (TensorData::Bool(x), TensorData::Bool(y)) => bool_binary(op, x, y, sh),
            (TensorData::String(x), TensorData::String(y)) if op == BinaryOp::Equal => {
                Some(TensorData::Bool(sh.zip(x, y, |p, q| p == q)))
            }
            _ => None,
        };
        data.ok_or_else(|| unsupported!("{name} on {} tensors", a.dtype()))?
    };
    tensor(out_shape, data)
}

// ---------------------------------------------------------------------------
// Fast binary paths: tight row loops, vectorized for the CPU's level, parallel
// when large. Same closures as the reference kernels above, so the results are
// bitwise identical to them.
// ---------------------------------------------------------------------------

/// Flat operand offsets of output row `row` of `plan` (rows are the merged
/// innermost dimension), and the multi-index counter for walking on from it.
fn plan_row_start<const K: usize>(plan: &Plan<K>, row: usize) -> ([usize; K], Vec<usize>) {
    let r = plan.dims.len();
    let mut counter = vec![0usize; r - 1];
    let mut offs = [0usize; K];
    let mut rem = row;
    for ax in (0..r - 1).rev() {
        let i = rem % plan.dims[ax];
        rem /= plan.dims[ax];
        counter[ax] = i;
        for (o, s) in offs.iter_mut().zip(&plan.strides[ax]) {
            *o += i * s;
        }
    }
    (offs, counter)
}

/// Moves `offs`/`counter` to the next row of `plan`.
fn plan_next_row<const K: usize>(plan: &Plan<K>, offs: &mut [usize; K], counter: &mut [usize]) {
    for ax in (0..counter.len()).rev() {
        counter[ax] += 1;
        for (o, s) in offs.iter_mut().zip(&plan.strides[ax]) {
            *o += s;
        }
        if counter[ax] < plan.dims[ax] {
            return;
        }
        for (o, s) in offs.iter_mut().zip(&plan.strides[ax]) {
            *o -= s * counter[ax];
        }
        counter[ax] = 0;
    }
}

/// `d[i] = f(a[oa + i*sa], b[ob + i*sb])` for one row, with the contiguous
/// and broadcast cases as separate loops so each vectorizes.
#[inline(always)]
fn zip_row<A: Copy, B: Copy, O>(
    d: &mut [O],
    (a, oa, sa): (&[A], usize, usize),
    (b, ob, sb): (&[B], usize, usize),
    f: &impl Fn(A, B) -> O,
) {
    let n = d.len();
    match (sa, sb) {
        (1, 1) => {
            for ((o, &x), &y) in d.iter_mut().zip(&a[oa..oa + n]).zip(&b[ob..ob + n]) {
                *o = f(x, y);
            }
        }
        (1, 0) => {
            let y = b[ob];
            for (o, &x) in d.iter_mut().zip(&a[oa..oa + n]) {
                *o = f(x, y);
            }
        }
        (0, 1) => {
            let x = a[oa];
            for (o, &y) in d.iter_mut().zip(&b[ob..ob + n]) {
                *o = f(x, y);
            }
        }
        _ => {
            for (i, o) in d.iter_mut().enumerate() {
                *o = f(a[oa + i * sa], b[ob + i * sb]);
            }
        }
    }
}

/// `f` over every broadcast pair like [`Shapes::zip`], but into a
/// preallocated buffer, with each row loop compiled for the CPU's vector level
/// and, from `fastmath::PAR_MIN` elements on, split across threads in pieces of
/// about `fastmath::PAR_CHUNK` elements.
fn fast_zip<A, B, O>(sh: Shapes, a: &[A], b: &[B], f: impl Fn(A, B) -> O + Sync) -> Vec<O>
where
    A: Copy + Sync,
    B: Copy + Sync,
    O: Copy + Default + Send + 'static,
{
    use rayon::prelude::*;
    let plan = Plan::new(sh.out, [sh.a, sh.b]);
    let total = plan.total();
    let mut out = out_vec::<O>(total);
    if total == 0 {
        return out;
    }
    let inner = plan.dims[plan.dims.len() - 1];
    let [sa, sb] = plan.strides[plan.dims.len() - 1];
    // Rows [row0, row0 + dst.len() / inner) into dst.
    let rows = |row0: usize, dst: &mut [O]| {
        fastmath::simd(
            #[inline(always)]
            || {
                let (mut offs, mut counter) = plan_row_start(&plan, row0);
                for d in dst.chunks_mut(inner) {
                    zip_row(d, (a, offs[0], sa), (b, offs[1], sb), &f);
                    plan_next_row(&plan, &mut offs, &mut counter);
                }
            },
        )
    };
    if total < fastmath::PAR_MIN {
        rows(0, &mut out);
    } else if plan.dims.len() == 1 {
        // One long row (same shapes, or a scalar operand): split the row.
        out.par_chunks_mut(fastmath::PAR_CHUNK)
            .enumerate()
            .for_each(|(t, d)| {
                let start = t * fastmath::PAR_CHUNK;
                fastmath::simd(
                    #[inline(always)]
                    || zip_row(d, (a, start * sa, sa), (b, start * sb, sb), &f),
                );
            });
    } else {
        let per_task = (fastmath::PAR_CHUNK / inner).max(1);
        out.par_chunks_mut(per_task * inner)
            .enumerate()
            .for_each(|(t, d)| rows(t * per_task, d));
    }
    out
}

/// A buffer of `n` values that the caller overwrites entirely: for f32, one
/// from the buffer pool (`crate::buffers`, no zeroing) from 4 KiB up, else
/// zeros.
fn out_vec<O: Copy + Default + 'static>(n: usize) -> Vec<O> {
    if std::any::TypeId::of::<O>() == std::any::TypeId::of::<f32>() {
        let mut v = std::mem::ManuallyDrop::new(crate::buffers::take_f32(n));
        // SAFETY: O is f32 (the TypeId check above), so the allocation,
        // length and capacity are those of a Vec<O>; the ManuallyDrop keeps
        // the original from freeing it.
        return unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut O, v.len(), v.capacity()) };
    }
    vec![O::default(); n]
}

/// The fast path of a float binary op (the closures of [`float_binary`]).
fn fast_float_binary<T>(op: BinaryOp, x: &[T], y: &[T], sh: Shapes) -> Option<TensorData>
where
    T: FloatElem<C = T> + Real + Default + Send + Sync,
{
    let zero = T::ZERO;
    // Macros, not helper closures taking `fn` pointers, so that every op's
    // closure is inlined into its own loop.
    macro_rules! arith {
        ($f:expr) => {
            T::wrap(fast_zip(sh, x, y, $f))
        };
    }
    macro_rules! cmp {
        ($f:expr) => {
            TensorData::Bool(fast_zip(sh, x, y, $f))
        };
    }
    Some(match op {
        BinaryOp::Add => arith!(|p: T, q: T| p + q),
        BinaryOp::Sub => arith!(|p: T, q: T| p - q),
        BinaryOp::Mul => arith!(|p: T, q: T| p * q),
        BinaryOp::Div => arith!(|p: T, q: T| p / q),
        BinaryOp::Max => arith!(|p: T, q: T| {
            if p.is_nan() || q.is_nan() {
                p + q
            } else if p >= q {
                p
            } else {
                q
            }
        }),
        BinaryOp::Min => arith!(|p: T, q: T| {
            if p.is_nan() || q.is_nan() {
                p + q
            } else if p <= q {
                p
            } else {
                q
            }
        }),
        BinaryOp::PRelu => arith!(move |p: T, s: T| if p < zero { s * p } else { p }),
        BinaryOp::Equal => cmp!(|p: T, q: T| p == q),
        BinaryOp::Less => cmp!(|p: T, q: T| p < q),
        BinaryOp::LessOrEqual => cmp!(|p: T, q: T| p <= q),
        BinaryOp::Greater => cmp!(|p: T, q: T| p > q),
        BinaryOp::GreaterOrEqual => cmp!(|p: T, q: T| p >= q),
        _ => return None,
    })
}

/// The fast path of an integer binary op (the ops that cannot fail).
fn fast_int_binary<I>(op: BinaryOp, x: &[I], y: &[I], sh: Shapes) -> Option<TensorData>
where
    I: IntElem + Default + Send + Sync,
{
    macro_rules! arith {
        ($f:expr) => {
            I::wrap(fast_zip(sh, x, y, $f))
        };
    }
    macro_rules! cmp {
        ($f:expr) => {
            TensorData::Bool(fast_zip(sh, x, y, $f))
        };
    }
    Some(match op {
        BinaryOp::Add => arith!(|p: I, q: I| p.wadd(q)),
        BinaryOp::Sub => arith!(|p: I, q: I| p.wsub(q)),
        BinaryOp::Mul => arith!(|p: I, q: I| p.wmul(q)),
        BinaryOp::Max => arith!(|p: I, q: I| p.max(q)),
        BinaryOp::Min => arith!(|p: I, q: I| p.min(q)),
        BinaryOp::BitwiseAnd => arith!(|p: I, q: I| p.band(q)),
        BinaryOp::BitwiseOr => arith!(|p: I, q: I| p.bor(q)),
        BinaryOp::BitwiseXor => arith!(|p: I, q: I| p.bxor(q)),
        BinaryOp::Equal => cmp!(|p: I, q: I| p == q),
        BinaryOp::Less => cmp!(|p: I, q: I| p < q),
        BinaryOp::LessOrEqual => cmp!(|p: I, q: I| p <= q),
        BinaryOp::Greater => cmp!(|p: I, q: I| p > q),
        BinaryOp::GreaterOrEqual => cmp!(|p: I, q: I| p >= q),
        _ => return None,
    })
}

/// Fast paths for f32/f64 and the common integer types; `None` sends the op
/// to the reference kernels. `binary` takes them for outputs of
/// `fastmath::PAR_MIN` elements and up: there they run in parallel into a
/// pooled buffer (PP-OCRv4 det's 27 Adds, mostly 2.5M elements each,
/// 3.0 -> 2.3 ms; the model 23.1 -> 21.4 ms); below it the per-row
/// dispatch cost more than the reference's `extend` loops.
fn fast_binary(op: BinaryOp, a: &TensorData, b: &TensorData, sh: Shapes) -> Option<TensorData> {
    match (a, b) {
        (TensorData::F32(x), TensorData::F32(y)) => fast_float_binary(op, x, y, sh),
        (TensorData::F64(x), TensorData::F64(y)) => fast_float_binary(op, x, y, sh),
        (TensorData::I32(x), TensorData::I32(y)) => fast_int_binary(op, x, y, sh),
        (TensorData::I64(x), TensorData::I64(y)) => fast_int_binary(op, x, y, sh),
        (TensorData::I8(x), TensorData::I8(y)) => fast_int_binary(op, x, y, sh),
        (TensorData::U8(x), TensorData::U8(y)) => fast_int_binary(op, x, y, sh),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Variadic, Clip, Where
// ---------------------------------------------------------------------------

/// Sum / Mean / Max / Min of one or more inputs, broadcast together. Max and
/// Min propagate NaN. Mean is defined for float tensors only.
pub fn variadic(op: VariadicOp, xs: &[&Tensor]) -> Result<Tensor> {
    let name = Op::Variadic(op).name();
    let (first, rest) = xs
        .split_first()
        .ok_or_else(|| invalid!("{name} needs at least one input"))?;
    let supported = if op == VariadicOp::Mean {
        first.dtype().is_float()
    } else {
        first.dtype().is_numeric()
    };
    if !supported {
        return Err(unsupported!("{name} on {} tensors", first.dtype()));
    }
    let bop = match op {
        VariadicOp::Sum | VariadicOp::Mean => BinaryOp::Add,
        VariadicOp::Max => BinaryOp::Max,
        VariadicOp::Min => BinaryOp::Min,
    };
    let mut acc = (*first).clone();
    for x in rest {
        acc = binary_named(bop, &acc, x, name)?;
    }
    if op == VariadicOp::Mean && xs.len() > 1 {
        fn div<S: FloatElem>(v: &mut [S], n: usize) {
            let n = <S::C as Real>::c(n as f64);
            for p in v.iter_mut() {
                *p = S::down(p.up() / n);
            }
        }
        let n = xs.len();
        match acc.data_mut() {
            TensorData::F32(v) => div(v, n),
            TensorData::F64(v) => div(v, n),
            TensorData::F16(v) => div(v, n),
            TensorData::BF16(v) => div(v, n),
            _ => return Err(unsupported!("{name} on {} tensors", first.dtype())),
        }
    }
    Ok(acc)
}

fn clip_vals<T: Element + Copy + PartialOrd>(
    v: &[T],
    lo: Option<&Tensor>,
    hi: Option<&Tensor>,
) -> Vec<T> {
    let first = |t: Option<&Tensor>| t.and_then(|t| t.as_slice::<T>()?.first().copied());
    let (lo, hi) = (first(lo), first(hi));
    v.iter()
        .map(|&x| {
            let mut r = x;
            if let Some(l) = lo {
                if r < l {
                    r = l;
                }
            }
            if let Some(h) = hi {
                if r > h {
                    r = h;
                }
            }
            r
        })
        .collect()
}

/// Clip to `[min, max]`; either bound is optional and must be a one-element
/// tensor of x's dtype. When min > max every value becomes max; NaN passes
/// through.
pub fn clip(x: &Tensor, min: Option<&Tensor>, max: Option<&Tensor>) -> Result<Tensor> {
    for (t, what) in [(min, "min"), (max, "max")] {
        if let Some(t) = t {
            if t.dtype() != x.dtype() {
                return Err(invalid!(
                    "Clip: {what} has dtype {} but the input has dtype {}",
                    t.dtype(),
                    x.dtype()
                ));
            }
            if t.len() != 1 {
                return Err(invalid!(
                    "Clip: {what} must be a scalar (one element), got shape {:?}",
                    t.shape()
                ));
            }
        }
    }
    let data = match x.data() {
        TensorData::F32(v) => {
            let first = |t: Option<&Tensor>| t.and_then(|t| t.as_slice::<f32>()?.first().copied());
            let func = Func::Clip {
                min: first(min).unwrap_or(f32::NEG_INFINITY),
                max: first(max).unwrap_or(f32::INFINITY),
            };
            TensorData::F32(fastmath::map_vec(func, v))
        }
        TensorData::F64(v) => TensorData::F64(clip_vals(v, min, max)),
        TensorData::F16(v) => TensorData::F16(clip_vals(v, min, max)),
        TensorData::BF16(v) => TensorData::BF16(clip_vals(v, min, max)),
        TensorData::I8(v) => TensorData::I8(clip_vals(v, min, max)),
        TensorData::I16(v) => TensorData::I16(clip_vals(v, min, max)),
        TensorData::I32(v) => TensorData::I32(clip_vals(v, min, max)),
        TensorData::I64(v) => TensorData::I64(clip_vals(v, min, max)),
        TensorData::U8(v) => TensorData::U8(clip_vals(v, min, max)),
        TensorData::U16(v) => TensorData::U16(clip_vals(v, min, max)),
        TensorData::U32(v) => TensorData::U32(clip_vals(v, min, max)),
        TensorData::U64(v) => TensorData::U64(clip_vals(v, min, max)),
        TensorData::Bool(_) | TensorData::String(_) | TensorData::Bits(..) => {
            return Err(unsupported!("Clip on {} tensors", x.dtype()))
        }
    };
    tensor(x.shape().to_vec(), data)
}

/// `cond ? x : y` with three-way broadcasting; x and y may have any (shared)
/// dtype.
pub fn where_(c: &Tensor, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let cond = c
        .as_slice::<bool>()
        .ok_or_else(|| invalid!("Where: condition must be a bool tensor, got {}", c.dtype()))?;
    let out = broadcast_shape(c.shape(), x.shape())
        .and_then(|s| broadcast_shape(&s, y.shape()))
        .map_err(|_| {
            invalid!(
                "Where: shapes {:?} (condition), {:?} (X) and {:?} (Y) cannot be broadcast together",
                c.shape(),
                x.shape(),
                y.shape()
            )
        })?;
    let cs = (cond, c.shape());
    let data = same_pair!(
        x.data(),
        y.data(),
        |xv, yv| select(cs, (xv, x.shape()), (yv, y.shape()), &out),
        _ => {
            return Err(invalid!(
                "Where: X and Y must have the same dtype, got {} and {}",
                x.dtype(),
                y.dtype()
            ))
        }
    );
    tensor(out, data)
}

// ---------------------------------------------------------------------------
// Cast
// ---------------------------------------------------------------------------

/// Conversion of one element to every numeric / bool / string type.
/// Numeric conversions follow Rust `as` (ints wrap; float to int truncates
/// toward zero and saturates, NaN gives 0); f16/bf16 targets round once.
trait CastSrc: Copy {
    fn c_f32(self) -> f32;
    fn c_f64(self) -> f64;
    fn c_f16(self) -> f16;
    fn c_bf16(self) -> bf16;
    fn c_i8(self) -> i8;
    fn c_i16(self) -> i16;
    fn c_i32(self) -> i32;
    fn c_i64(self) -> i64;
    fn c_u8(self) -> u8;
    fn c_u16(self) -> u16;
    fn c_u32(self) -> u32;
    fn c_u64(self) -> u64;
    fn c_bool(self) -> bool;
    fn c_string(self) -> String;
}

macro_rules! cast_src_prim {
    ($t:ty, $zero:expr, $fmt:expr) => {
        #[allow(clippy::unnecessary_cast)]
        impl CastSrc for $t {
            fn c_f32(self) -> f32 {
                self as f32
            }
            fn c_f64(self) -> f64 {
                self as f64
            }
            fn c_f16(self) -> f16 {
                f16::from_f64(self as f64)
            }
            fn c_bf16(self) -> bf16 {
                bf16::from_f64(self as f64)
            }
            fn c_i8(self) -> i8 {
                self as i8
            }
            fn c_i16(self) -> i16 {
                self as i16
            }
            fn c_i32(self) -> i32 {
                self as i32
            }
            fn c_i64(self) -> i64 {
                self as i64
            }
            fn c_u8(self) -> u8 {
                self as u8
            }
            fn c_u16(self) -> u16 {
                self as u16
            }
            fn c_u32(self) -> u32 {
                self as u32
            }
            fn c_u64(self) -> u64 {
                self as u64
            }
            fn c_bool(self) -> bool {
                self != $zero
            }
            fn c_string(self) -> String {
                $fmt(self)
            }
        }
    };
}

fn int_string<T: ToString>(v: T) -> String {
    v.to_string()
}

/// ONNX Runtime's literals for the special values, else `None`.
fn special_string(nan: bool, inf: bool, negative: bool) -> Option<String> {
    if nan {
        Some("NaN".into())
    } else if inf {
        Some(if negative { "-INF" } else { "INF" }.into())
    } else {
        None
    }
}

/// Shortest decimal that round-trips, in plain (non-scientific) notation.
fn f32_string(v: f32) -> String {
    special_string(v.is_nan(), v.is_infinite(), v < 0.0).unwrap_or_else(|| v.to_string())
}

fn f64_string(v: f64) -> String {
    special_string(v.is_nan(), v.is_infinite(), v < 0.0).unwrap_or_else(|| v.to_string())
}

/// Shortest decimal that round-trips through a 16-bit float type (`same`
/// checks that an f64 rounds back to the original value).
fn half_string(v: f32, same: impl Fn(f64) -> bool) -> String {
    if let Some(s) = special_string(v.is_nan(), v.is_infinite(), v < 0.0) {
        return s;
    }
    for p in 0..9 {
        if let Ok(y) = format!("{v:.p$e}").parse::<f64>() {
            if same(y) {
                // `y` has at most p+1 significant digits, so its shortest f64
                // form prints exactly those digits.
                return y.to_string();
            }
        }
    }
    v.to_string()
}

cast_src_prim!(f32, 0.0, f32_string);
cast_src_prim!(f64, 0.0, f64_string);
cast_src_prim!(i8, 0, int_string);
cast_src_prim!(i16, 0, int_string);
cast_src_prim!(i32, 0, int_string);
cast_src_prim!(i64, 0, int_string);
cast_src_prim!(i128, 0, int_string);
cast_src_prim!(u8, 0, int_string);
cast_src_prim!(u16, 0, int_string);
cast_src_prim!(u32, 0, int_string);
cast_src_prim!(u64, 0, int_string);

macro_rules! cast_src_half {
    ($t:ident, $other:ident, $c_other:ident) => {
        impl CastSrc for $t {
            fn c_f32(self) -> f32 {
                self.to_f32()
            }
            fn c_f64(self) -> f64 {
                self.to_f64()
            }
            fn $c_other(self) -> $other {
                $other::from_f32(self.to_f32())
            }
            fn c_i8(self) -> i8 {
                self.to_f32() as i8
            }
            fn c_i16(self) -> i16 {
                self.to_f32() as i16
            }
            fn c_i32(self) -> i32 {
                self.to_f32() as i32
            }
            fn c_i64(self) -> i64 {
                self.to_f32() as i64
            }
            fn c_u8(self) -> u8 {
                self.to_f32() as u8
            }
            fn c_u16(self) -> u16 {
                self.to_f32() as u16
            }
            fn c_u32(self) -> u32 {
                self.to_f32() as u32
            }
            fn c_u64(self) -> u64 {
                self.to_f32() as u64
            }
            fn c_bool(self) -> bool {
                self.to_f32() != 0.0
            }
            fn c_string(self) -> String {
                half_string(self.to_f32(), |y| {
                    $t::from_f64(y).to_bits() == self.to_bits()
                })
            }
            cast_src_half!(@ident $t);
        }
    };
    (@ident f16) => {
        fn c_f16(self) -> f16 {
            self
        }
    };
    (@ident bf16) => {
        fn c_bf16(self) -> bf16 {
            self
        }
    };
}
cast_src_half!(f16, bf16, c_bf16);
cast_src_half!(bf16, f16, c_f16);

impl CastSrc for bool {
    fn c_f32(self) -> f32 {
        u8::from(self).into()
    }
    fn c_f64(self) -> f64 {
        u8::from(self).into()
    }
    fn c_f16(self) -> f16 {
        if self {
            f16::ONE
        } else {
            f16::ZERO
        }
    }
    fn c_bf16(self) -> bf16 {
        if self {
            bf16::ONE
        } else {
            bf16::ZERO
        }
    }
    fn c_i8(self) -> i8 {
        self.into()
    }
    fn c_i16(self) -> i16 {
        self.into()
    }
    fn c_i32(self) -> i32 {
        self.into()
    }
    fn c_i64(self) -> i64 {
        self.into()
    }
    fn c_u8(self) -> u8 {
        self.into()
    }
    fn c_u16(self) -> u16 {
        self.into()
    }
    fn c_u32(self) -> u32 {
        self.into()
    }
    fn c_u64(self) -> u64 {
        self.into()
    }
    fn c_bool(self) -> bool {
        self
    }
    /// "1" / "0", as ONNX Runtime prints bools.
    fn c_string(self) -> String {
        if self { "1" } else { "0" }.into()
    }
}

fn cast_from<S: CastSrc>(v: &[S], to: DType) -> TensorData {
    macro_rules! each {
        ($variant:ident, $m:ident) => {
            TensorData::$variant(v.iter().map(|&x| x.$m()).collect())
        };
    }
    match to {
        DType::F32 => each!(F32, c_f32),
        DType::F64 => each!(F64, c_f64),
        DType::F16 => each!(F16, c_f16),
        DType::BF16 => each!(BF16, c_bf16),
        DType::I8 => each!(I8, c_i8),
        DType::I16 => each!(I16, c_i16),
        DType::I32 => each!(I32, c_i32),
        DType::I64 => each!(I64, c_i64),
        DType::U8 => each!(U8, c_u8),
        DType::U16 => each!(U16, c_u16),
        DType::U32 => each!(U32, c_u32),
        DType::U64 => each!(U64, c_u64),
        DType::Bool => each!(Bool, c_bool),
        DType::String => each!(String, c_string),
        // Low-precision targets are handled by `cast_with`; this covers the
        // rest through f64 (exact for floats and for integers below 2^53).
        d => TensorData::Bits(
            d,
            v.iter().map(|&x| d.encode_f64(x.c_f64(), true)).collect(),
        ),
    }
}

/// A number parsed from a string: an exact integer when it is written as one.
#[derive(Clone, Copy)]
enum Num {
    Int(i128),
    Float(f64),
}

fn parse_num(s: &str) -> Option<Num> {
    if let Ok(i) = s.parse::<i128>() {
        return Some(Num::Int(i));
    }
    s.parse::<f64>().ok().map(Num::Float)
}

/// Strings to numbers: plain and scientific notation, and (case-insensitive)
/// "inf", "+inf", "-inf", "infinity", "nan". Strings written as integers
/// convert exactly (wrapping like an integer cast); others go through f64 and
/// truncate toward zero. To bool: "true"/"false" or a number != 0.
fn cast_strings(v: &[String], to: DType) -> Result<TensorData> {
    fn each<T>(v: &[String], to: DType, f: impl Fn(&str) -> Option<T>) -> Result<Vec<T>> {
        v.iter()
            .map(|s| {
                f(s.trim()).ok_or_else(|| invalid!("Cast: cannot parse the string {s:?} as {to}"))
            })
            .collect()
    }
    macro_rules! num {
        ($variant:ident, $m:ident) => {
            TensorData::$variant(each(v, to, |s| {
                parse_num(s).map(|n| match n {
                    Num::Int(i) => i.$m(),
                    Num::Float(f) => f.$m(),
                })
            })?)
        };
    }
    Ok(match to {
        DType::F32 => TensorData::F32(each(v, to, |s| s.parse::<f32>().ok())?),
        DType::F64 => TensorData::F64(each(v, to, |s| s.parse::<f64>().ok())?),
        DType::F16 => TensorData::F16(each(v, to, |s| s.parse::<f64>().ok().map(f16::from_f64))?),
        DType::BF16 => {
            TensorData::BF16(each(v, to, |s| s.parse::<f64>().ok().map(bf16::from_f64))?)
        }
        DType::I8 => num!(I8, c_i8),
        DType::I16 => num!(I16, c_i16),
        DType::I32 => num!(I32, c_i32),
        DType::I64 => num!(I64, c_i64),
        DType::U8 => num!(U8, c_u8),
        DType::U16 => num!(U16, c_u16),
        DType::U32 => num!(U32, c_u32),
        DType::U64 => num!(U64, c_u64),
        DType::Bool => TensorData::Bool(each(v, to, |s| {
            if s.eq_ignore_ascii_case("true") {
                Some(true)
            } else if s.eq_ignore_ascii_case("false") {
                Some(false)
            } else {
                parse_num(s).map(|n| match n {
                    Num::Int(i) => i != 0,
                    Num::Float(f) => f != 0.0,
                })
            }
        })?),
        DType::String => TensorData::String(v.to_vec()),
        d => TensorData::Bits(
            d,
            each(v, to, |s| {
                s.parse::<f64>().ok().map(|f| d.encode_f64(f, true))
            })?,
        ),
    })
}

/// Converts every element to `to` (any pair of dtypes). Numbers format as the
/// shortest decimal that round-trips, in plain notation; NaN and infinities as
/// "NaN", "INF", "-INF"; bools as "1"/"0".
pub fn cast(x: &Tensor, to: DType) -> Result<Tensor> {
    cast_with(x, to, true, "up")
}

/// [`cast`] with Cast's `saturate` (float8 targets: out-of-range values and
/// infinities become the largest finite value instead of infinity or NaN) and
/// `round_mode` (e8m0 targets: "up", "down" or "nearest").
///
/// Low-precision sources convert through their exact value (f32 for the small
/// floats, i64 for the small integers). Low-precision targets: floats round to
/// nearest even (e8m0 per `round_mode`); to 4- and 2-bit integers values
/// truncate toward zero and wrap, like `astype` in ml_dtypes.
pub fn cast_with(x: &Tensor, to: DType, saturate: bool, round_mode: &str) -> Result<Tensor> {
    if x.dtype() == to {
        return Ok(x.clone());
    }
    if !matches!(round_mode, "up" | "down" | "nearest") {
        return Err(invalid!(
            "Cast: round_mode must be \"up\", \"down\" or \"nearest\", got {round_mode:?}"
        ));
    }
    if let TensorData::Bits(d, v) = x.data() {
        let wide = if d.is_small_int() {
            let w: Vec<i64> = v.iter().map(|&b| d.decode_bits(b) as i64).collect();
            tensor(x.shape().to_vec(), TensorData::I64(w))?
        } else {
            let w: Vec<f32> = v.iter().map(|&b| d.decode_bits(b)).collect();
            tensor(x.shape().to_vec(), TensorData::F32(w))?
        };
        return cast_with(&wide, to, saturate, round_mode);
    }
    if to.is_bits() {
        let from = x.dtype();
        let bits: Vec<u8> = if from == DType::String {
            let wide = cast(x, DType::F64)?;
            return cast_with(&wide, to, saturate, round_mode);
        } else if from.is_int() || from == DType::Bool {
            let ints = x.to_i64_vec().map_err(|e| invalid!("{e}"))?;
            if to.is_small_int() {
                let mask = if to.bit_width() == 4 { 0xF } else { 0x3 };
                ints.iter().map(|&i| (i as u8) & mask).collect()
            } else {
                let floats: Vec<f64> = match x.data() {
                    TensorData::U64(u) => u.iter().map(|&q| q as f64).collect(),
                    _ => ints.iter().map(|&i| i as f64).collect(),
                };
                floats
                    .iter()
                    .map(|&f| encode_small(to, f, saturate, round_mode))
                    .collect()
            }
        } else {
            let floats = x.to_f64_vec().map_err(|e| invalid!("{e}"))?;
            floats
                .iter()
                .map(|&f| encode_small(to, f, saturate, round_mode))
                .collect()
        };
        return tensor(x.shape().to_vec(), TensorData::Bits(to, bits));
    }
    let data = match x.data() {
        TensorData::F32(v) => cast_from(v, to),
        TensorData::F64(v) => cast_from(v, to),
        TensorData::F16(v) => cast_from(v, to),
        TensorData::BF16(v) => cast_from(v, to),
        TensorData::I8(v) => cast_from(v, to),
        TensorData::I16(v) => cast_from(v, to),
        TensorData::I32(v) => cast_from(v, to),
        TensorData::I64(v) => cast_from(v, to),
        TensorData::U8(v) => cast_from(v, to),
        TensorData::U16(v) => cast_from(v, to),
        TensorData::U32(v) => cast_from(v, to),
        TensorData::U64(v) => cast_from(v, to),
        TensorData::Bool(v) => cast_from(v, to),
        TensorData::String(v) => cast_strings(v, to)?,
        TensorData::Bits(..) => return Err(invalid!("Cast: unexpected packed source")),
    };
    tensor(x.shape().to_vec(), data)
}

/// One value to a low-precision type (see [`cast_with`]).
fn encode_small(to: DType, f: f64, saturate: bool, round_mode: &str) -> u8 {
    if to == DType::F8E8M0 {
        DType::encode_e8m0(f as f32, saturate, round_mode)
    } else {
        to.encode_f64(f, saturate)
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::broadcast_indices;
    use crate::KernelError;

    fn t<T: Element>(shape: &[usize], v: Vec<T>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    fn vals<T: Element>(x: &Tensor) -> Vec<T> {
        x.as_slice::<T>().unwrap().to_vec()
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= rel * a.abs().max(b.abs())
    }

    fn assert_close(got: &[f32], want: &[f64], rel: f64) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(close(*g as f64, *w, rel), "got {got:?}, want {want:?}");
        }
    }

    fn un(op: UnaryOp, x: &Tensor) -> Tensor {
        unary(&op, x).unwrap()
    }

    fn bin(op: BinaryOp, a: &Tensor, b: &Tensor) -> Tensor {
        binary(op, a, b).unwrap()
    }

    fn is_invalid<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(KernelError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn is_unsupported<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(KernelError::Unsupported(m)) => m,
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    // --- erf -------------------------------------------------------------

    /// Reference values from CPython's math.erf.
    const ERF_REF: [(f64, f64); 11] = [
        (0.1, 0.1124629160182849),
        (0.3, 0.3286267594591274),
        (0.5, 0.5204998778130465),
        (1.0, 0.8427007929497149),
        (1.5, 0.9661051464753108),
        (2.0, 0.9953222650189527),
        (2.5, 0.999593047982555),
        (3.0, 0.9999779095030014),
        (4.0, 0.9999999845827421),
        (5.0, 0.9999999999984626),
        (1e-10, 1.1283791670955126e-10),
    ];

    #[test]
    fn erf_known_values_f64() {
        for (x, want) in ERF_REF {
            assert!(
                close(erf(x), want, 4e-16),
                "erf({x}) = {} want {want}",
                erf(x)
            );
            assert!(close(erf(-x), -want, 4e-16));
        }
        assert_eq!(erf(0.0), 0.0);
        assert!(erf(-0.0).is_sign_negative());
        assert_eq!(erf(7.0), 1.0);
        assert_eq!(erf(f64::INFINITY), 1.0);
        assert_eq!(erf(f64::NEG_INFINITY), -1.0);
        assert!(erf(f64::NAN).is_nan());
    }

    #[test]
    fn erf_table_matches_reference() {
        // Many points in every piece, including the boundaries.
        let mut x = 0.0;
        while x < 6.5 {
            let (a, b) = (erf(x), erf_reference(x));
            assert!(close(a, b, 1e-15), "x={x}: table {a} reference {b}");
            x += 0.00390625 * 1.37;
        }
    }

    #[test]
    fn erf_f32_tensor() {
        let xs: Vec<f32> = ERF_REF.iter().map(|&(x, _)| x as f32).collect();
        // The reference kernel; the fast f32 path is checked against it in
        // `fast_unary_matches_reference`.
        let y = unary_reference(&UnaryOp::Erf, &Tensor::vector(xs.clone())).unwrap();
        for (g, x) in vals::<f32>(&y).iter().zip(&xs) {
            // Reference at the f32 input, rounded once.
            let want = erf_reference(*x as f64) as f32;
            assert!(
                (g - want).abs() <= f32::EPSILON * want.abs(),
                "erf({x}) = {g}, want {want}"
            );
        }
        let y = unary_reference(&UnaryOp::Erf, &Tensor::vector(vec![0.5f32])).unwrap();
        assert!(close(vals::<f32>(&y)[0] as f64, 0.5204998778130465, 1e-7));
    }

    // --- unary -------------------------------------------------------------

    #[test]
    fn unary_float_basics() {
        let x = Tensor::vector(vec![-2.0f32, -0.5, 0.0, 0.5, 2.0]);
        assert_eq!(
            vals::<f32>(&un(UnaryOp::Relu, &x)),
            [0.0, 0.0, 0.0, 0.5, 2.0]
        );
        assert_eq!(
            vals::<f32>(&un(UnaryOp::Neg, &x)),
            [2.0, 0.5, -0.0, -0.5, -2.0]
        );
        assert_eq!(
            vals::<f32>(&un(UnaryOp::Abs, &x)),
            [2.0, 0.5, 0.0, 0.5, 2.0]
        );
        assert_eq!(
            vals::<f32>(&un(UnaryOp::Sign, &x)),
            [-1.0, -1.0, 0.0, 1.0, 1.0]
        );
        assert_eq!(
            vals::<f32>(&un(UnaryOp::Floor, &x)),
            [-2.0, -1.0, 0.0, 0.0, 2.0]
        );
        assert_eq!(
            vals::<f32>(&un(UnaryOp::Ceil, &x)),
            [-2.0, -0.0, 0.0, 1.0, 2.0]
        );
        assert_close(
            &vals::<f32>(&un(UnaryOp::LeakyRelu { alpha: 0.1 }, &x)),
            &[-0.2, -0.05, 0.0, 0.5, 2.0],
            1e-7,
        );
        assert_eq!(
            vals::<f32>(&un(UnaryOp::ThresholdedRelu { alpha: 0.5 }, &x)),
            [0.0, 0.0, 0.0, 0.0, 2.0]
        );
        assert_close(
            &vals::<f32>(&un(
                UnaryOp::HardSigmoid {
                    alpha: 0.2,
                    beta: 0.5,
                },
                &x,
            )),
            &[0.1, 0.4, 0.5, 0.6, 0.9],
            1e-6,
        );
        let r = Tensor::vector(vec![0.5f32, 1.5, 2.5, -0.5, -2.5, 3.7, -3.2]);
        assert_eq!(
            vals::<f32>(&un(UnaryOp::Round, &r)),
            [0.0, 2.0, 2.0, -0.0, -2.0, 4.0, -3.0]
        );
        let v = Tensor::vector(vec![4.0f32, 0.25]);
        assert_eq!(vals::<f32>(&un(UnaryOp::Sqrt, &v)), [2.0, 0.5]);
        assert_eq!(vals::<f32>(&un(UnaryOp::Reciprocal, &v)), [0.25, 4.0]);
        let nan = Tensor::vector(vec![f32::NAN]);
        for op in [
            UnaryOp::Relu,
            UnaryOp::Sign,
            UnaryOp::Sigmoid,
            UnaryOp::Softplus,
        ] {
            assert!(vals::<f32>(&un(op, &nan))[0].is_nan());
        }
    }

    #[test]
    fn unary_float_transcendental() {
        let x = Tensor::vector(vec![-1000.0f32, -1.0, 0.0, 1.0, 1000.0]);
        let e = std::f64::consts::E;
        assert_close(
            &vals::<f32>(&un(UnaryOp::Sigmoid, &x)),
            &[0.0, 1.0 / (1.0 + e), 0.5, 1.0 / (1.0 + 1.0 / e), 1.0],
            1e-7,
        );
        assert_close(
            &vals::<f32>(&un(UnaryOp::Softplus, &x)),
            &[0.0, (1.0 + 1.0 / e).ln(), 2f64.ln(), (1.0 + e).ln(), 1000.0],
            1e-7,
        );
        assert_close(
            &vals::<f32>(&un(UnaryOp::Softsign, &x)),
            &[-1000.0 / 1001.0, -0.5, 0.0, 0.5, 1000.0 / 1001.0],
            1e-7,
        );
        let sp1 = (1.0 + e).ln();
        let spm1 = (1.0 + 1.0 / e).ln();
        assert_close(
            &vals::<f32>(&un(UnaryOp::Mish, &x)),
            &[-0.0, -spm1.tanh(), 0.0, sp1.tanh(), 1000.0],
            1e-6,
        );
        let h = Tensor::vector(vec![-4.0f32, -1.0, 0.0, 1.0, 4.0]);
        assert_close(
            &vals::<f32>(&un(UnaryOp::HardSwish, &h)),
            &[0.0, -1.0 / 3.0, 0.0, 2.0 / 3.0, 4.0],
            1e-7,
        );
        let g = Tensor::vector(vec![-3.0f32, -1.0, 0.0, 1.0, 3.0]);
        // 0.5 x (1 + erf(x / sqrt 2)) from CPython.
        assert_close(
            &vals::<f32>(&un(UnaryOp::Gelu { tanh_approx: false }, &g)),
            &[
                -0.00404969409489031,
                -0.15865525393145707,
                0.0,
                0.8413447460685429,
                2.99595030590511,
            ],
            1e-6,
        );
        assert_close(
            &vals::<f32>(&un(UnaryOp::Gelu { tanh_approx: true }, &g)),
            &[
                -0.0036373920817729943,
                -0.15880800939172324,
                0.0,
                0.8411919906082768,
                2.996362607918227,
            ],
            1e-6,
        );
        let one = Tensor::vector(vec![-1.0f32, 2.0]);
        assert_close(
            &vals::<f32>(&un(UnaryOp::Elu { alpha: 2.0 }, &one)),
            &[2.0 * (1.0 / e - 1.0), 2.0],
            1e-7,
        );
        assert_close(
            &vals::<f32>(&un(UnaryOp::Celu { alpha: 2.0 }, &one)),
            &[2.0 * ((-0.5f64).exp() - 1.0), 2.0],
            1e-7,
        );
        assert_close(
            &vals::<f32>(&un(
                UnaryOp::Selu {
                    alpha: 1.5,
                    gamma: 2.0,
                },
                &one,
            )),
            &[2.0 * 1.5 * (1.0 / e - 1.0), 4.0],
            1e-7,
        );
        let a = Tensor::vector(vec![0.5f32]);
        for (op, want) in [
            (UnaryOp::Sin, 0.5f64.sin()),
            (UnaryOp::Cos, 0.5f64.cos()),
            (UnaryOp::Tan, 0.5f64.tan()),
            (UnaryOp::Asin, 0.5f64.asin()),
            (UnaryOp::Acos, 0.5f64.acos()),
            (UnaryOp::Atan, 0.5f64.atan()),
            (UnaryOp::Sinh, 0.5f64.sinh()),
            (UnaryOp::Cosh, 0.5f64.cosh()),
            (UnaryOp::Asinh, 0.5f64.asinh()),
            (UnaryOp::Atanh, 0.5f64.atanh()),
            (UnaryOp::Tanh, 0.5f64.tanh()),
            (UnaryOp::Exp, 0.5f64.exp()),
            (UnaryOp::Log, 0.5f64.ln()),
        ] {
            assert_close(&vals::<f32>(&un(op, &a)), &[want], 2e-7);
        }
        assert_close(
            &vals::<f32>(&un(UnaryOp::Acosh, &Tensor::vector(vec![2.0f32]))),
            &[2f64.acosh()],
            2e-7,
        );
    }

    #[test]
    fn unary_f64_and_half_types() {
        let x = Tensor::vector(vec![0.5f64, 2.0]);
        let y = un(UnaryOp::Erf, &x);
        assert!(close(vals::<f64>(&y)[0], 0.5204998778130465, 5e-16));
        let h = Tensor::vector(vec![f16::from_f32(4.0), f16::from_f32(-1.0)]);
        assert_eq!(
            vals::<f16>(&un(UnaryOp::Relu, &h)),
            [f16::from_f32(4.0), f16::ZERO]
        );
        let s = un(UnaryOp::Sqrt, &Tensor::vector(vec![f16::from_f32(2.0)]));
        assert_eq!(vals::<f16>(&s), [f16::from_f32(std::f32::consts::SQRT_2)]);
        let b = un(UnaryOp::Exp, &Tensor::vector(vec![bf16::from_f32(1.0)]));
        assert_eq!(vals::<bf16>(&b), [bf16::from_f32(std::f32::consts::E)]);
        assert_eq!(b.dtype(), DType::BF16);
    }

    #[test]
    fn unary_predicates() {
        let x = t(
            &[2, 2],
            vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0],
        );
        let n = un(UnaryOp::IsNaN, &x);
        assert_eq!(n.shape(), &[2, 2]);
        assert_eq!(vals::<bool>(&n), [true, false, false, false]);
        let inf = |p, q| {
            vals::<bool>(&un(
                UnaryOp::IsInf {
                    detect_positive: p,
                    detect_negative: q,
                },
                &x,
            ))
        };
        assert_eq!(inf(true, true), [false, true, true, false]);
        assert_eq!(inf(true, false), [false, true, false, false]);
        assert_eq!(inf(false, true), [false, false, true, false]);
        let h = Tensor::vector(vec![f16::NAN, f16::INFINITY]);
        assert_eq!(vals::<bool>(&un(UnaryOp::IsNaN, &h)), [true, false]);
    }

    #[test]
    fn unary_ints_and_bool() {
        let x = Tensor::vector(vec![i32::MIN, -3, 0, 5]);
        assert_eq!(vals::<i32>(&un(UnaryOp::Neg, &x)), [i32::MIN, 3, 0, -5]);
        assert_eq!(vals::<i32>(&un(UnaryOp::Abs, &x)), [i32::MIN, 3, 0, 5]);
        assert_eq!(vals::<i32>(&un(UnaryOp::Sign, &x)), [-1, -1, 0, 1]);
        assert_eq!(vals::<i32>(&un(UnaryOp::Relu, &x)), [0, 0, 0, 5]);
        assert_eq!(
            vals::<i32>(&un(UnaryOp::BitwiseNot, &x)),
            [i32::MAX, 2, -1, -6]
        );
        let u = Tensor::vector(vec![0u8, 7, 255]);
        assert_eq!(vals::<u8>(&un(UnaryOp::Abs, &u)), [0, 7, 255]);
        assert_eq!(vals::<u8>(&un(UnaryOp::Sign, &u)), [0, 1, 1]);
        assert_eq!(vals::<u8>(&un(UnaryOp::BitwiseNot, &u)), [255, 248, 0]);
        let i8s = Tensor::vector(vec![-128i8, -1]);
        assert_eq!(vals::<i8>(&un(UnaryOp::Abs, &i8s)), [-128, 1]);
        let b = Tensor::vector(vec![true, false]);
        assert_eq!(vals::<bool>(&un(UnaryOp::Not, &b)), [false, true]);
    }

    #[test]
    fn unary_unsupported_dtypes() {
        let s = Tensor::vector(vec!["a".to_string()]);
        assert_eq!(
            is_unsupported(unary(&UnaryOp::Relu, &s)),
            "Relu on string tensors"
        );
        let u = Tensor::vector(vec![1u8]);
        assert_eq!(
            is_unsupported(unary(&UnaryOp::Neg, &u)),
            "Neg on u8 tensors"
        );
        let i = Tensor::vector(vec![1i32]);
        assert_eq!(
            is_unsupported(unary(&UnaryOp::Exp, &i)),
            "Exp on i32 tensors"
        );
        let f = Tensor::vector(vec![1.0f32]);
        assert_eq!(
            is_unsupported(unary(&UnaryOp::Not, &f)),
            "Not on f32 tensors"
        );
        let b = Tensor::vector(vec![true]);
        assert_eq!(
            is_unsupported(unary(
                &UnaryOp::IsInf {
                    detect_positive: true,
                    detect_negative: true
                },
                &b
            )),
            "IsInf on bool tensors"
        );
    }

    #[test]
    fn unary_empty_and_scalar() {
        let e = Tensor::from_vec(vec![0, 3], Vec::<f32>::new()).unwrap();
        let y = un(UnaryOp::Exp, &e);
        assert_eq!(y.shape(), &[0, 3]);
        assert!(y.is_empty());
        let s = un(UnaryOp::Neg, &Tensor::scalar(2.0f32));
        assert_eq!(s.shape(), &[] as &[usize]);
        assert_eq!(vals::<f32>(&s), [-2.0]);
    }

    // --- binary ------------------------------------------------------------

    #[test]
    fn broadcast_shapes_and_values() {
        let a = t(&[2, 1], vec![1.0f32, 2.0]);
        let b = t(&[3], vec![10.0f32, 20.0, 30.0]);
        let y = bin(BinaryOp::Add, &a, &b);
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(vals::<f32>(&y), [11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
        let y = bin(BinaryOp::Sub, &b, &a);
        assert_eq!(vals::<f32>(&y), [9.0, 19.0, 29.0, 8.0, 18.0, 28.0]);
        // Scalar (rank 0) with tensor, both orders.
        let s = Tensor::scalar(2.0f32);
        assert_eq!(vals::<f32>(&bin(BinaryOp::Mul, &s, &b)), [20.0, 40.0, 60.0]);
        assert_eq!(vals::<f32>(&bin(BinaryOp::Div, &b, &s)), [5.0, 10.0, 15.0]);
        // Rank 0 with rank 0.
        let y = bin(BinaryOp::Add, &s, &Tensor::scalar(3.0f32));
        assert_eq!(y.shape(), &[] as &[usize]);
        assert_eq!(vals::<f32>(&y), [5.0]);
        // Size-1 dims on both sides.
        let p = t(&[1, 3, 1], vec![1i64, 2, 3]);
        let q = t(&[2, 1, 2], vec![10i64, 20, 30, 40]);
        let y = bin(BinaryOp::Mul, &p, &q);
        assert_eq!(y.shape(), &[2, 3, 2]);
        assert_eq!(
            vals::<i64>(&y),
            [10, 20, 20, 40, 30, 60, 30, 40, 60, 80, 90, 120]
        );
        // Shape [1] against a scalar keeps rank 1.
        let y = bin(
            BinaryOp::Add,
            &Tensor::vector(vec![1i32]),
            &Tensor::scalar(1i32),
        );
        assert_eq!(y.shape(), &[1]);
        // Incompatible.
        let m = is_invalid(binary(
            BinaryOp::Add,
            &Tensor::vector(vec![1.0f32, 2.0]),
            &b,
        ));
        assert!(
            m.contains("Add") && m.contains("[2]") && m.contains("[3]"),
            "{m}"
        );
    }

    #[test]
    fn broadcast_matches_index_reference() {
        let cases: [(&[usize], &[usize]); 9] = [
            (&[2, 3, 4], &[3, 1]),
            (&[2, 3, 4], &[2, 1, 4]),
            (&[4], &[3, 2, 1]),
            (&[1, 1, 5], &[5]),
            (&[3, 1, 2, 1], &[1, 4, 1, 3]),
            (&[2, 3], &[2, 3]),
            (&[], &[2, 2]),
            (&[1], &[2, 1, 3]),
            (&[2, 1, 3], &[1, 3]),
        ];
        for (sa, sb) in cases {
            let na: usize = sa.iter().product();
            let nb: usize = sb.iter().product();
            let a = t(sa, (0..na as i64).collect());
            let b = t(sb, (0..nb as i64).map(|v| v * 1000).collect());
            let y = bin(BinaryOp::Add, &a, &b);
            let out = broadcast_shape(sa, sb).unwrap();
            let ia = broadcast_indices(sa, &out);
            let ib = broadcast_indices(sb, &out);
            let want: Vec<i64> = ia
                .iter()
                .zip(&ib)
                .map(|(&i, &j)| i as i64 + 1000 * j as i64)
                .collect();
            assert_eq!(y.shape(), &out[..]);
            assert_eq!(vals::<i64>(&y), want, "{sa:?} + {sb:?}");
        }
    }

    #[test]
    fn broadcast_empty() {
        let a = Tensor::from_vec(vec![0, 3], Vec::<f32>::new()).unwrap();
        let b = Tensor::vector(vec![1.0f32, 2.0, 3.0]);
        let y = bin(BinaryOp::Add, &a, &b);
        assert_eq!(y.shape(), &[0, 3]);
        assert!(y.is_empty());
        let c = Tensor::from_vec(vec![2, 0], Vec::<i32>::new()).unwrap();
        let y = bin(BinaryOp::Mul, &c, &Tensor::scalar(3i32));
        assert_eq!(y.shape(), &[2, 0]);
        let y = bin(BinaryOp::Add, &c, &t(&[2, 1], vec![1i32, 2]));
        assert_eq!(y.shape(), &[2, 0]);
        // An empty output does not divide, so zeros in B are fine.
        let y = bin(BinaryOp::Div, &c, &t(&[2, 1], vec![0i32, 0]));
        assert!(y.is_empty());
        // [0] against [3] does not broadcast.
        let e = Tensor::from_vec(vec![0], Vec::<f32>::new()).unwrap();
        assert!(binary(BinaryOp::Add, &e, &b).is_err());
    }

    #[test]
    fn dtype_mismatch_is_an_error() {
        let a = Tensor::vector(vec![1.0f32]);
        let b = Tensor::vector(vec![1i64]);
        let m = is_invalid(binary(BinaryOp::Add, &a, &b));
        assert!(
            m.contains("f32") && m.contains("i64") && m.contains("Add"),
            "{m}"
        );
    }

    #[test]
    fn integer_division_and_modulo() {
        let a = Tensor::vector(vec![7i32, -7, 7, -7, i32::MIN]);
        let b = Tensor::vector(vec![2i32, 2, -2, -2, -1]);
        assert_eq!(
            vals::<i32>(&bin(BinaryOp::Div, &a, &b)),
            [3, -3, -3, 3, i32::MIN]
        );
        assert_eq!(
            vals::<i32>(&bin(BinaryOp::Mod { fmod: true }, &a, &b)),
            [1, -1, 1, -1, 0]
        );
        let a = Tensor::vector(vec![-7i64, 7, -7, 7, 6]);
        let b = Tensor::vector(vec![3i64, -3, -3, 3, 3]);
        assert_eq!(
            vals::<i64>(&bin(BinaryOp::Mod { fmod: false }, &a, &b)),
            [2, -2, -1, 1, 0]
        );
        assert_eq!(
            vals::<i64>(&bin(BinaryOp::Mod { fmod: true }, &a, &b)),
            [-1, 1, -1, 1, 0]
        );
        let u = Tensor::vector(vec![7u8, 200]);
        assert_eq!(
            vals::<u8>(&bin(BinaryOp::Div, &u, &Tensor::scalar(2u8))),
            [3, 100]
        );
        // Division by zero is an error, not a panic.
        let z = Tensor::vector(vec![1i32, 0]);
        let m = is_invalid(binary(BinaryOp::Div, &Tensor::vector(vec![4i32, 4]), &z));
        assert!(m.contains("division by zero"), "{m}");
        let m = is_invalid(binary(
            BinaryOp::Mod { fmod: false },
            &Tensor::scalar(4u16),
            &Tensor::scalar(0u16),
        ));
        assert!(m.contains("Mod"), "{m}");
        // Floats divide by zero per IEEE.
        let y = bin(
            BinaryOp::Div,
            &Tensor::vector(vec![1.0f32, -1.0, 0.0]),
            &Tensor::scalar(0.0f32),
        );
        let y = vals::<f32>(&y);
        assert_eq!(y[..2], [f32::INFINITY, f32::NEG_INFINITY]);
        assert!(y[2].is_nan());
    }

    #[test]
    fn integer_arithmetic_wraps() {
        let a = Tensor::vector(vec![i8::MAX, i8::MIN, 100]);
        let b = Tensor::vector(vec![1i8, -1, 2]);
        assert_eq!(
            vals::<i8>(&bin(BinaryOp::Add, &a, &b)),
            [i8::MIN, i8::MAX, 102]
        );
        assert_eq!(vals::<i8>(&bin(BinaryOp::Sub, &a, &b)), [126, -127, 98]);
        assert_eq!(vals::<i8>(&bin(BinaryOp::Mul, &a, &b)), [127, i8::MIN, -56]);
        assert_eq!(vals::<i8>(&bin(BinaryOp::Max, &a, &b)), [127, -1, 100]);
        assert_eq!(vals::<i8>(&bin(BinaryOp::Min, &a, &b)), [1, -128, 2]);
    }

    #[test]
    fn float_modulo() {
        let a = Tensor::vector(vec![5.5f32, -5.5, 5.5, -5.5]);
        let b = Tensor::vector(vec![2.0f32, 2.0, -2.0, -2.0]);
        assert_eq!(
            vals::<f32>(&bin(BinaryOp::Mod { fmod: true }, &a, &b)),
            [1.5, -1.5, 1.5, -1.5]
        );
        assert_eq!(
            vals::<f32>(&bin(BinaryOp::Mod { fmod: false }, &a, &b)),
            [1.5, 0.5, -0.5, -1.5]
        );
    }

    #[test]
    fn pow_variants() {
        let x = Tensor::vector(vec![2.0f32, 3.0, -2.0]);
        assert_eq!(
            vals::<f32>(&bin(BinaryOp::Pow, &x, &Tensor::scalar(2.0f32))),
            [4.0, 9.0, 4.0]
        );
        assert_eq!(
            vals::<f32>(&bin(BinaryOp::Pow, &x, &Tensor::scalar(3i64))),
            [8.0, 27.0, -8.0]
        );
        let y = bin(BinaryOp::Pow, &x, &Tensor::vector(vec![0.5f32, -1.0, 0.5]));
        let y = vals::<f32>(&y);
        assert!(close(y[0] as f64, 2f64.sqrt(), 1e-7));
        assert!(close(y[1] as f64, 1.0 / 3.0, 1e-7));
        assert!(y[2].is_nan());
        // f64 exponent on an f32 base keeps f32.
        let y = bin(BinaryOp::Pow, &x, &Tensor::scalar(2.0f64));
        assert_eq!(y.dtype(), DType::F32);
        // Integer base.
        let i = Tensor::vector(vec![2i32, 3, -1, -1, 1, 5, 2]);
        let e = Tensor::vector(vec![10i32, -1, -3, -4, -5, 0, 31]);
        assert_eq!(
            vals::<i32>(&bin(BinaryOp::Pow, &i, &e)),
            [1024, 0, -1, 1, 1, 1, i32::MIN]
        );
        let e64 = Tensor::vector(vec![3i64; 7]);
        assert_eq!(vals::<i32>(&bin(BinaryOp::Pow, &i, &e64))[..2], [8, 27]);
        // Integer base, float exponent: truncated.
        let y = bin(
            BinaryOp::Pow,
            &Tensor::vector(vec![2i64, 10]),
            &Tensor::scalar(0.5f32),
        );
        assert_eq!(vals::<i64>(&y), [1, 3]);
        // 0 to a negative power.
        let m = is_invalid(binary(
            BinaryOp::Pow,
            &Tensor::scalar(0i32),
            &Tensor::scalar(-1i32),
        ));
        assert!(m.contains("negative"), "{m}");
        // Half base.
        let h = bin(
            BinaryOp::Pow,
            &Tensor::vector(vec![f16::from_f32(3.0)]),
            &Tensor::scalar(2.0f32),
        );
        assert_eq!(vals::<f16>(&h), [f16::from_f32(9.0)]);
        assert!(binary(BinaryOp::Pow, &x, &Tensor::scalar(true)).is_err());
    }

    #[test]
    fn comparisons() {
        let a = Tensor::vector(vec![1.0f32, 2.0, f32::NAN]);
        let b = Tensor::vector(vec![2.0f32, 2.0, f32::NAN]);
        assert_eq!(
            vals::<bool>(&bin(BinaryOp::Equal, &a, &b)),
            [false, true, false]
        );
        assert_eq!(
            vals::<bool>(&bin(BinaryOp::Less, &a, &b)),
            [true, false, false]
        );
        assert_eq!(
            vals::<bool>(&bin(BinaryOp::LessOrEqual, &a, &b)),
            [true, true, false]
        );
        assert_eq!(
            vals::<bool>(&bin(BinaryOp::Greater, &a, &b)),
            [false, false, false]
        );
        assert_eq!(
            vals::<bool>(&bin(BinaryOp::GreaterOrEqual, &a, &b)),
            [false, true, false]
        );
        let i = t(&[2, 1], vec![1u64, 5]);
        let j = Tensor::vector(vec![1u64, 3, 7]);
        let y = bin(BinaryOp::Greater, &i, &j);
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(vals::<bool>(&y), [false, false, false, true, true, false]);
        let s = Tensor::vector(vec!["a".to_string(), "b".to_string()]);
        let y = bin(BinaryOp::Equal, &s, &Tensor::scalar("b".to_string()));
        assert_eq!(vals::<bool>(&y), [false, true]);
        let p = Tensor::vector(vec![true, false]);
        assert_eq!(
            vals::<bool>(&bin(BinaryOp::Equal, &p, &Tensor::scalar(false))),
            [false, true]
        );
        assert_eq!(
            is_unsupported(binary(BinaryOp::Less, &p, &p)),
            "Less on bool tensors"
        );
        assert_eq!(
            is_unsupported(binary(BinaryOp::Less, &s, &s)),
            "Less on string tensors"
        );
        let h = Tensor::vector(vec![bf16::from_f32(1.0), bf16::from_f32(3.0)]);
        assert_eq!(
            vals::<bool>(&bin(
                BinaryOp::Less,
                &h,
                &Tensor::scalar(bf16::from_f32(2.0))
            )),
            [true, false]
        );
    }

    #[test]
    fn logic_and_bits() {
        let a = Tensor::vector(vec![true, true, false, false]);
        let b = Tensor::vector(vec![true, false, true, false]);
        assert_eq!(
            vals::<bool>(&bin(BinaryOp::And, &a, &b)),
            [true, false, false, false]
        );
        assert_eq!(
            vals::<bool>(&bin(BinaryOp::Or, &a, &b)),
            [true, true, true, false]
        );
        assert_eq!(
            vals::<bool>(&bin(BinaryOp::Xor, &a, &b)),
            [false, true, true, false]
        );
        let f = Tensor::vector(vec![1.0f32]);
        assert_eq!(
            is_unsupported(binary(BinaryOp::And, &f, &f)),
            "And on f32 tensors"
        );
        let x = Tensor::vector(vec![1u8, 200, 16, 255]);
        let s = Tensor::vector(vec![3u8, 1, 8, 0]);
        assert_eq!(
            vals::<u8>(&bin(BinaryOp::BitShiftLeft, &x, &s)),
            [8, 144, 0, 255]
        );
        assert_eq!(
            vals::<u8>(&bin(BinaryOp::BitShiftRight, &x, &s)),
            [0, 100, 0, 255]
        );
        let w = Tensor::vector(vec![1u64 << 63]);
        assert_eq!(
            vals::<u64>(&bin(BinaryOp::BitShiftRight, &w, &Tensor::scalar(63u64))),
            [1]
        );
        assert_eq!(
            vals::<u64>(&bin(BinaryOp::BitShiftLeft, &w, &Tensor::scalar(64u64))),
            [0]
        );
        // Signed: left shifts wrap, right shifts are arithmetic; shifts out of
        // range (negative, or >= the width) give the sign fill.
        let i = Tensor::vector(vec![64i8, 1, -64, -8, 4, -1, -8]);
        let n = Tensor::vector(vec![1i8, 7, 1, 8, 9, 127, -1]);
        assert_eq!(
            vals::<i8>(&bin(BinaryOp::BitShiftLeft, &i, &n)),
            [-128, -128, -128, 0, 0, 0, 0]
        );
        assert_eq!(
            vals::<i8>(&bin(BinaryOp::BitShiftRight, &i, &n)),
            [32, 0, -32, -1, 0, -1, -1]
        );
        let f = Tensor::vector(vec![1.0f32]);
        assert_eq!(
            is_unsupported(binary(BinaryOp::BitShiftLeft, &f, &f)),
            "BitShift on f32 tensors"
        );
        let p = Tensor::vector(vec![0b1100i32, -1]);
        let q = Tensor::vector(vec![0b1010i32, 5]);
        assert_eq!(vals::<i32>(&bin(BinaryOp::BitwiseAnd, &p, &q)), [0b1000, 5]);
        assert_eq!(vals::<i32>(&bin(BinaryOp::BitwiseOr, &p, &q)), [0b1110, -1]);
        assert_eq!(
            vals::<i32>(&bin(BinaryOp::BitwiseXor, &p, &q)),
            [0b0110, -6]
        );
        assert!(binary(BinaryOp::BitwiseAnd, &f, &f).is_err());
    }

    #[test]
    fn prelu_and_nan_max_min() {
        let x = t(&[2, 3], vec![-1.0f32, 2.0, -3.0, 4.0, -5.0, 0.0]);
        let slope = Tensor::vector(vec![0.1f32, 0.2, 0.5]);
        let y = bin(BinaryOp::PRelu, &x, &slope);
        assert_eq!(y.shape(), &[2, 3]);
        assert_close(&vals::<f32>(&y), &[-0.1, 2.0, -1.5, 4.0, -1.0, 0.0], 1e-7);
        let xi = Tensor::vector(vec![-4i32, 4]);
        assert_eq!(
            vals::<i32>(&bin(BinaryOp::PRelu, &xi, &Tensor::scalar(2i32))),
            [-8, 4]
        );
        let a = Tensor::vector(vec![f32::NAN, 1.0, 3.0]);
        let b = Tensor::vector(vec![1.0f32, f32::NAN, 2.0]);
        let mx = vals::<f32>(&bin(BinaryOp::Max, &a, &b));
        assert!(mx[0].is_nan() && mx[1].is_nan() && mx[2] == 3.0);
        let mn = vals::<f32>(&bin(BinaryOp::Min, &a, &b));
        assert!(mn[0].is_nan() && mn[1].is_nan() && mn[2] == 2.0);
    }

    // --- variadic ------------------------------------------------------------

    #[test]
    fn variadic_ops() {
        let a = t(&[2, 1], vec![1.0f32, 2.0]);
        let b = Tensor::vector(vec![10.0f32, 20.0, 30.0]);
        let c = Tensor::scalar(100.0f32);
        let y = variadic(VariadicOp::Sum, &[&a, &b, &c]).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(vals::<f32>(&y), [111.0, 121.0, 131.0, 112.0, 122.0, 132.0]);
        let y = variadic(VariadicOp::Mean, &[&a, &b]).unwrap();
        assert_eq!(vals::<f32>(&y), [5.5, 10.5, 15.5, 6.0, 11.0, 16.0]);
        let y = variadic(VariadicOp::Max, &[&a, &b, &Tensor::scalar(15.0f32)]).unwrap();
        assert_eq!(vals::<f32>(&y), [15.0, 20.0, 30.0, 15.0, 20.0, 30.0]);
        let y = variadic(VariadicOp::Min, &[&b, &Tensor::scalar(f32::NAN)]).unwrap();
        assert!(vals::<f32>(&y).iter().all(|v| v.is_nan()));
        let y = variadic(VariadicOp::Mean, &[&a]).unwrap();
        assert_eq!(y, a);
        let i = Tensor::vector(vec![1i32, 2]);
        let y = variadic(VariadicOp::Sum, &[&i, &i, &i]).unwrap();
        assert_eq!(vals::<i32>(&y), [3, 6]);
        let h = Tensor::vector(vec![f16::from_f32(1.0)]);
        let y = variadic(
            VariadicOp::Mean,
            &[&h, &Tensor::vector(vec![f16::from_f32(2.0)])],
        )
        .unwrap();
        assert_eq!(vals::<f16>(&y), [f16::from_f32(1.5)]);
        assert!(is_invalid(variadic(VariadicOp::Sum, &[])).contains("at least one"));
        assert_eq!(
            is_unsupported(variadic(VariadicOp::Mean, &[&i, &i])),
            "Mean on i32 tensors"
        );
        let st = Tensor::scalar("x".to_string());
        assert_eq!(
            is_unsupported(variadic(VariadicOp::Max, &[&st])),
            "Max on string tensors"
        );
        let m = is_invalid(variadic(VariadicOp::Sum, &[&a, &i]));
        assert!(
            m.starts_with("Sum:") && m.contains("f32") && m.contains("i32"),
            "{m}"
        );
    }

    // --- clip ---------------------------------------------------------------

    #[test]
    fn clip_bounds() {
        let x = Tensor::vector(vec![-2.0f32, 0.5, 3.0, f32::NAN]);
        let lo = Tensor::scalar(0.0f32);
        let hi = Tensor::vector(vec![1.0f32]); // shape [1] is accepted
        let y = vals::<f32>(&clip(&x, Some(&lo), Some(&hi)).unwrap());
        assert_eq!(y[..3], [0.0, 0.5, 1.0]);
        assert!(y[3].is_nan());
        let y = vals::<f32>(&clip(&x, Some(&lo), None).unwrap());
        assert_eq!(y[..3], [0.0, 0.5, 3.0]);
        let y = vals::<f32>(&clip(&x, None, Some(&hi)).unwrap());
        assert_eq!(y[..3], [-2.0, 0.5, 1.0]);
        let y = clip(&x, None, None).unwrap();
        assert_eq!(vals::<f32>(&y)[..3], [-2.0, 0.5, 3.0]);
        // min > max: everything becomes max.
        let y = clip(&x, Some(&Tensor::scalar(5.0f32)), Some(&hi)).unwrap();
        assert_eq!(vals::<f32>(&y)[..3], [1.0, 1.0, 1.0]);
        let i = t(&[2, 2], vec![-5i64, 0, 5, 10]);
        let y = clip(
            &i,
            Some(&Tensor::scalar(-1i64)),
            Some(&Tensor::scalar(6i64)),
        )
        .unwrap();
        assert_eq!(y.shape(), &[2, 2]);
        assert_eq!(vals::<i64>(&y), [-1, 0, 5, 6]);
        let u = clip(
            &Tensor::vector(vec![1u8, 9]),
            None,
            Some(&Tensor::scalar(4u8)),
        )
        .unwrap();
        assert_eq!(vals::<u8>(&u), [1, 4]);
        let m = is_invalid(clip(&x, Some(&Tensor::scalar(0i64)), None));
        assert!(
            m.contains("min") && m.contains("i64") && m.contains("f32"),
            "{m}"
        );
        let m = is_invalid(clip(&x, None, Some(&Tensor::vector(vec![1.0f32, 2.0]))));
        assert!(m.contains("max") && m.contains("scalar"), "{m}");
        assert_eq!(
            is_unsupported(clip(&Tensor::vector(vec![true]), None, None)),
            "Clip on bool tensors"
        );
    }

    // --- where --------------------------------------------------------------

    #[test]
    fn where_broadcasts_three_ways() {
        let c = t(&[2, 1], vec![true, false]);
        let x = Tensor::vector(vec![1.0f32, 2.0, 3.0]);
        let y = Tensor::scalar(-1.0f32);
        let r = where_(&c, &x, &y).unwrap();
        assert_eq!(r.shape(), &[2, 3]);
        assert_eq!(vals::<f32>(&r), [1.0, 2.0, 3.0, -1.0, -1.0, -1.0]);
        let c = Tensor::vector(vec![true, false, true]);
        let xs = Tensor::scalar("yes".to_string());
        let ys = t(&[2, 1], vec!["no".to_string(), "nein".to_string()]);
        let r = where_(&c, &xs, &ys).unwrap();
        assert_eq!(r.shape(), &[2, 3]);
        assert_eq!(
            vals::<String>(&r),
            ["yes", "no", "yes", "yes", "nein", "yes"]
        );
        let r = where_(
            &Tensor::scalar(false),
            &Tensor::scalar(1i8),
            &Tensor::scalar(2i8),
        )
        .unwrap();
        assert_eq!(r.shape(), &[] as &[usize]);
        assert_eq!(vals::<i8>(&r), [2]);
        let e = Tensor::from_vec(vec![0], Vec::<bool>::new()).unwrap();
        assert!(where_(&e, &Tensor::scalar(1i8), &Tensor::scalar(2i8))
            .unwrap()
            .is_empty());
        assert!(is_invalid(where_(&x, &x, &x)).contains("bool"));
        let m = is_invalid(where_(&c, &x, &Tensor::scalar(1i32)));
        assert!(m.contains("f32") && m.contains("i32"), "{m}");
        assert!(where_(&t(&[2], vec![true, false]), &x, &y).is_err());
    }

    // --- cast ---------------------------------------------------------------

    #[test]
    fn cast_numeric() {
        let x = Tensor::vector(vec![1.5f32, -1.5, 2.9, -2.9, 1e10, f32::NAN, -0.0]);
        assert_eq!(
            vals::<i32>(&cast(&x, DType::I32).unwrap()),
            [1, -1, 2, -2, i32::MAX, 0, 0]
        );
        assert_eq!(
            vals::<u8>(&cast(&x, DType::U8).unwrap()),
            [1, 0, 2, 0, 255, 0, 0]
        );
        assert_eq!(
            vals::<bool>(&cast(&x, DType::Bool).unwrap()),
            [true, true, true, true, true, true, false]
        );
        let i = Tensor::vector(vec![300i32, -1, 0]);
        assert_eq!(vals::<u8>(&cast(&i, DType::U8).unwrap()), [44, 255, 0]);
        assert_eq!(
            vals::<bool>(&cast(&i, DType::Bool).unwrap()),
            [true, true, false]
        );
        assert_eq!(
            vals::<f64>(&cast(&i, DType::F64).unwrap()),
            [300.0, -1.0, 0.0]
        );
        let b = Tensor::vector(vec![true, false]);
        assert_eq!(vals::<f32>(&cast(&b, DType::F32).unwrap()), [1.0, 0.0]);
        assert_eq!(vals::<i64>(&cast(&b, DType::I64).unwrap()), [1, 0]);
        assert_eq!(
            vals::<f16>(&cast(&b, DType::F16).unwrap()),
            [f16::ONE, f16::ZERO]
        );
        let d = Tensor::vector(vec![0.1f64]);
        assert_eq!(vals::<f32>(&cast(&d, DType::F32).unwrap()), [0.1f32]);
        let same = cast(&x, DType::F32).unwrap();
        assert_eq!(same.shape(), x.shape());
        let e = Tensor::from_vec(vec![2, 0], Vec::<f32>::new()).unwrap();
        let y = cast(&e, DType::I8).unwrap();
        assert_eq!(y.shape(), &[2, 0]);
        assert_eq!(y.dtype(), DType::I8);
    }

    #[test]
    fn cast_half_round_trips() {
        let vals32 = vec![
            0.0f32,
            1.0,
            -2.5,
            0.099975586,
            65504.0,
            6.1035156e-5,
            f32::INFINITY,
        ];
        let x = Tensor::vector(vals32.clone());
        let h = cast(&x, DType::F16).unwrap();
        assert_eq!(h.dtype(), DType::F16);
        assert_eq!(vals::<f32>(&cast(&h, DType::F32).unwrap()), vals32);
        let b = cast(&Tensor::vector(vec![1.0f32, -3.0, 0.5]), DType::BF16).unwrap();
        assert_eq!(
            vals::<f32>(&cast(&b, DType::F32).unwrap()),
            [1.0, -3.0, 0.5]
        );
        // f16 <-> bf16, f16 -> int, f64 -> f16 rounding.
        let hb = cast(&h, DType::BF16).unwrap();
        assert_eq!(vals::<bf16>(&hb)[1], bf16::ONE);
        assert_eq!(vals::<i32>(&cast(&h, DType::I32).unwrap())[..3], [0, 1, -2]);
        let big = cast(&Tensor::vector(vec![1e6f64, 1.0 / 3.0]), DType::F16).unwrap();
        assert_eq!(vals::<f16>(&big), [f16::INFINITY, f16::from_f64(1.0 / 3.0)]);
    }

    #[test]
    fn cast_strings_both_ways() {
        let x = Tensor::vector(vec![
            0.1f32,
            1.0,
            -2.5,
            1e-3,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            123456.79,
        ]);
        let s = cast(&x, DType::String).unwrap();
        assert_eq!(
            vals::<String>(&s),
            [
                "0.1",
                "1",
                "-2.5",
                "0.001",
                "NaN",
                "INF",
                "-INF",
                "123456.79"
            ]
        );
        let back = vals::<f32>(&cast(&s, DType::F32).unwrap());
        assert_eq!(back[..4], [0.1, 1.0, -2.5, 1e-3]);
        assert!(back[4].is_nan());
        assert_eq!(back[5..], [f32::INFINITY, f32::NEG_INFINITY, 123456.79]);
        let inputs: Vec<String> = [
            "inf", "-INF", "+INF", "NaN", "nan", " 1e3 ", "-0.5", "Infinity",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let y = vals::<f64>(&cast(&Tensor::vector(inputs), DType::F64).unwrap());
        assert_eq!(y[..3], [f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY]);
        assert!(y[3].is_nan() && y[4].is_nan());
        assert_eq!(y[5..], [1000.0, -0.5, f64::INFINITY]);
        let ints = Tensor::vector(vec![i64::MIN, 0, 42]);
        assert_eq!(
            vals::<String>(&cast(&ints, DType::String).unwrap()),
            ["-9223372036854775808", "0", "42"]
        );
        let strs: Vec<String> = ["42", "-7", "100.5", "1e3", "9223372036854775807"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            vals::<i64>(&cast(&Tensor::vector(strs.clone()), DType::I64).unwrap()),
            [42, -7, 100, 1000, i64::MAX]
        );
        assert_eq!(
            vals::<u8>(&cast(&Tensor::vector(strs), DType::U8).unwrap())[..3],
            [42, 249, 100]
        );
        let bools: Vec<String> = ["true", "False", "0", "1", "2.5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            vals::<bool>(&cast(&Tensor::vector(bools), DType::Bool).unwrap()),
            [true, false, false, true, true]
        );
        assert_eq!(
            vals::<String>(&cast(&Tensor::vector(vec![true, false]), DType::String).unwrap()),
            ["1", "0"]
        );
        let h = Tensor::vector(vec![
            f16::from_f32(0.1),
            f16::from_f32(1.0),
            f16::from_f32(-65504.0),
            f16::NAN,
        ]);
        assert_eq!(
            vals::<String>(&cast(&h, DType::String).unwrap()),
            ["0.1", "1", "-65500", "NaN"]
        );
        let hb = Tensor::vector(vec![bf16::from_f32(0.1), bf16::from_f32(3.0)]);
        assert_eq!(
            vals::<String>(&cast(&hb, DType::String).unwrap()),
            ["0.1", "3"]
        );
        let d = Tensor::vector(vec![0.1f64, 1e300]);
        let ds = vals::<String>(&cast(&d, DType::String).unwrap());
        assert_eq!(ds[0], "0.1");
        assert_eq!(ds[1].parse::<f64>().unwrap(), 1e300);
        // Bad strings are errors naming the string and the target type.
        let bad = Tensor::vector(vec!["1".to_string(), "hello".to_string()]);
        let m = is_invalid(cast(&bad, DType::F32));
        assert!(m.contains("hello") && m.contains("f32"), "{m}");
        assert!(cast(&bad, DType::I32).is_err());
        assert!(cast(&bad, DType::Bool).is_err());
        let hs = cast(&Tensor::vector(vec!["0.1".to_string()]), DType::F16).unwrap();
        assert_eq!(vals::<f16>(&hs), [f16::from_f32(0.1)]);
    }

    #[test]
    fn cast_every_pair() {
        let base = Tensor::vector(vec![0.0f32, 1.0, 2.0, 3.0]);
        for from in DType::ALL {
            let src = cast(&base, from).unwrap();
            assert_eq!(src.dtype(), from);
            for to in DType::ALL {
                let y = cast(&src, to).unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
                assert_eq!(y.dtype(), to);
                assert_eq!(y.shape(), &[4]);
                // Back to f32: 0 and 1 survive every round trip (bool included).
                let back = cast(&y, DType::F32).unwrap();
                // e8m0 has no zero: its smallest value is 2^-127.
                if from == DType::F8E8M0 || to == DType::F8E8M0 {
                    let v = vals::<f32>(&back);
                    assert!(
                        (v[0] < 1e-30 || to == DType::Bool) && v[1] == 1.0,
                        "{from} -> {to}"
                    );
                    continue;
                }
                assert_eq!(vals::<f32>(&back)[..2], [0.0, 1.0], "{from} -> {to}");
                // Not every type holds 2 and 3: bool, int2 (wraps).
                let small = |d: DType| matches!(d, DType::Bool | DType::I2);
                if !small(to) && !small(from) {
                    assert_eq!(vals::<f32>(&back), [0.0, 1.0, 2.0, 3.0], "{from} -> {to}");
                }
            }
        }
    }

    // --- fast paths against the reference kernels ---------------------------

    /// A deterministic pseudo-random sequence (LCG) in [0, 1).
    fn lcg(seed: u64) -> impl FnMut() -> f64 {
        let mut st = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        move || {
            st = st
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (st >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Random f32 values in [-8, 8) with NaN, +-inf, -0.0 and exact ties
    /// sprinkled in (every 13th value is a special one).
    fn rand_f32(n: usize, seed: u64) -> Vec<f32> {
        let mut r = lcg(seed);
        let special = [f32::NAN, -0.0, 0.0, f32::INFINITY, f32::NEG_INFINITY, 1.0];
        (0..n)
            .map(|i| {
                if i % 13 == 5 {
                    special[(r() * special.len() as f64) as usize]
                } else {
                    ((r() * 16.0 - 8.0) * 4.0).round() as f32 / 4.0 + (r() as f32) * 1e-3
                }
            })
            .collect()
    }

    fn binary_reference(op: BinaryOp, a: &Tensor, b: &Tensor) -> Tensor {
        let out = broadcast_shape(a.shape(), b.shape()).unwrap();
        let sh = Shapes {
            a: a.shape(),
            b: b.shape(),
            out: &out,
        };
        let data = match (a.data(), b.data()) {
            (TensorData::F32(x), TensorData::F32(y)) => float_binary(op, x, y, sh),
            (TensorData::F64(x), TensorData::F64(y)) => float_binary(op, x, y, sh),
            (TensorData::I32(x), TensorData::I32(y)) => int_binary(op, x, y, sh, "t").unwrap(),
            (TensorData::I64(x), TensorData::I64(y)) => int_binary(op, x, y, sh, "t").unwrap(),
            (TensorData::I8(x), TensorData::I8(y)) => int_binary(op, x, y, sh, "t").unwrap(),
            (TensorData::U8(x), TensorData::U8(y)) => int_binary(op, x, y, sh, "t").unwrap(),
            _ => unreachable!("binary_reference: dtype"),
        };
        tensor(out, data.unwrap()).unwrap()
    }

    /// The fast binary kernel (what `binary` runs on big outputs), as a tensor.
    fn fast_bin(op: BinaryOp, a: &Tensor, b: &Tensor) -> Tensor {
        let out = broadcast_shape(a.shape(), b.shape()).unwrap();
        let sh = Shapes {
            a: a.shape(),
            b: b.shape(),
            out: &out,
        };
        let data = fast_binary(op, a.data(), b.data(), sh).expect("a fast path");
        tensor(out, data).unwrap()
    }

    /// Equal shapes and values, NaN matching NaN.
    fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
        assert_eq!(got.shape(), want.shape(), "{what}");
        assert_eq!(got.dtype(), want.dtype(), "{what}");
        let same = match (got.data(), want.data()) {
            (TensorData::F32(g), TensorData::F32(w)) => g
                .iter()
                .zip(w)
                .all(|(g, w)| g.to_bits() == w.to_bits() || g.is_nan() && w.is_nan()),
            (TensorData::F64(g), TensorData::F64(w)) => g
                .iter()
                .zip(w)
                .all(|(g, w)| g.to_bits() == w.to_bits() || g.is_nan() && w.is_nan()),
            _ => got == want,
        };
        assert!(same, "{what}: fast path differs from the reference");
    }

    /// Operand shape pairs covering every fast pattern: empty, size 1, equal,
    /// scalar either side, suffix (bias) and per-channel broadcast, both
    /// operands broadcast, odd lengths, and sizes past the parallel threshold.
    const SHAPE_PAIRS: &[(&[usize], &[usize])] = &[
        (&[0, 3], &[3]),
        (&[1], &[1]),
        (&[7], &[7]),
        (&[], &[4, 5]),
        (&[4, 5], &[]),
        (&[17, 33], &[33]),
        (&[33], &[17, 33]),
        (&[17, 33], &[17, 1]),
        (&[2, 5, 7, 9], &[5, 1, 1]),
        (&[1, 5, 1, 1], &[2, 5, 7, 9]),
        (&[3, 1, 5], &[1, 4, 1]),
        (&[2, 3, 1, 1], &[2, 3, 1, 1]),
        (&[300, 301], &[301]),
        (&[70_001], &[70_001]),
        (&[70_001], &[1]),
        (&[1], &[70_001]),
        (&[2, 64, 33, 33], &[64, 1, 1]),
        (&[5, 1, 301, 70], &[5, 4, 1, 70]),
        (&[66_000, 1], &[1, 3]),
    ];

    #[test]
    fn fast_float_binary_matches_reference() {
        let ops = [
            BinaryOp::Add,
            BinaryOp::Sub,
            BinaryOp::Mul,
            BinaryOp::Div,
            BinaryOp::Max,
            BinaryOp::Min,
            BinaryOp::PRelu,
            BinaryOp::Equal,
            BinaryOp::Less,
            BinaryOp::LessOrEqual,
            BinaryOp::Greater,
            BinaryOp::GreaterOrEqual,
        ];
        for (i, (sa, sb)) in SHAPE_PAIRS.iter().enumerate() {
            let na: usize = sa.iter().product();
            let nb: usize = sb.iter().product();
            let a = t(sa, rand_f32(na, i as u64));
            let b = t(sb, rand_f32(nb, 100 + i as u64));
            let a64 = t(sa, vals::<f32>(&a).iter().map(|&v| v as f64).collect());
            let b64 = t(sb, vals::<f32>(&b).iter().map(|&v| v as f64).collect());
            for op in ops {
                let what = format!("{op:?} {sa:?} {sb:?}");
                assert_same(&fast_bin(op, &a, &b), &binary_reference(op, &a, &b), &what);
                assert_same(
                    &fast_bin(op, &a64, &b64),
                    &binary_reference(op, &a64, &b64),
                    &what,
                );
            }
        }
        // NaN propagates through Max/Min from either side; -0.0 vs 0.0 keeps
        // the first operand on ties (as the reference).
        let a = Tensor::vector(vec![f32::NAN, 1.0, -0.0, 0.0]);
        let b = Tensor::vector(vec![1.0, f32::NAN, 0.0, -0.0]);
        for op in [BinaryOp::Max, BinaryOp::Min] {
            let y = vals::<f32>(&fast_bin(op, &a, &b));
            assert!(y[0].is_nan() && y[1].is_nan(), "{op:?}: {y:?}");
            assert!(
                y[2].is_sign_negative() && y[3].is_sign_positive(),
                "{op:?}: {y:?}"
            );
        }
    }

    #[test]
    fn fast_int_binary_matches_reference() {
        let ops = [
            BinaryOp::Add,
            BinaryOp::Sub,
            BinaryOp::Mul,
            BinaryOp::Max,
            BinaryOp::Min,
            BinaryOp::BitwiseAnd,
            BinaryOp::BitwiseOr,
            BinaryOp::BitwiseXor,
            BinaryOp::Equal,
            BinaryOp::Less,
            BinaryOp::LessOrEqual,
            BinaryOp::Greater,
            BinaryOp::GreaterOrEqual,
        ];
        for (i, (sa, sb)) in SHAPE_PAIRS.iter().enumerate() {
            let na: usize = sa.iter().product();
            let nb: usize = sb.iter().product();
            // Wide random bits so that the wrapping cases occur.
            let mut r = lcg(7 + i as u64);
            let mut ints = |n: usize| -> Vec<i64> {
                (0..n)
                    .map(|k| {
                        if k % 11 == 3 {
                            [i64::MIN, i64::MAX, 0, -1][k % 4]
                        } else {
                            ((r() - 0.5) * 2f64.powi(63)) as i64
                        }
                    })
                    .collect()
            };
            let (va, vb) = (ints(na), ints(nb));
            let tensors = [
                (t(sa, va.clone()), t(sb, vb.clone())),
                (
                    t(sa, va.iter().map(|&v| v as i32).collect()),
                    t(sb, vb.iter().map(|&v| v as i32).collect()),
                ),
                (
                    t(sa, va.iter().map(|&v| v as i8).collect()),
                    t(sb, vb.iter().map(|&v| v as i8).collect()),
                ),
                (
                    t(sa, va.iter().map(|&v| v as u8).collect()),
                    t(sb, vb.iter().map(|&v| v as u8).collect()),
                ),
            ];
            for (a, b) in &tensors {
                for op in ops {
                    let what = format!("{op:?} {} {sa:?} {sb:?}", a.dtype());
                    assert_same(&fast_bin(op, a, b), &binary_reference(op, a, b), &what);
                }
            }
        }
    }

    #[test]
    fn fast_unary_matches_reference() {
        // A sweep plus special values; long enough for the parallel path.
        let mut xs: Vec<f32> = (0..80_000)
            .map(|i| (i as f32 - 40_000.0) / 1999.0)
            .collect();
        xs.extend(rand_f32(1000, 3));
        xs.extend([1e-30, -1e-30, 1e-40, -1e-40, 90.0, -90.0, 1e30, -1e30]);
        let x = Tensor::vector(xs.clone());
        let ops = [
            UnaryOp::Relu,
            UnaryOp::Sigmoid,
            UnaryOp::Tanh,
            UnaryOp::Erf,
            UnaryOp::Exp,
            UnaryOp::HardSwish,
            UnaryOp::LeakyRelu { alpha: 0.01 },
            UnaryOp::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            UnaryOp::Gelu { tanh_approx: false },
            UnaryOp::Gelu { tanh_approx: true },
        ];
        for op in ops {
            let got = vals::<f32>(&un(op.clone(), &x));
            let want = vals::<f32>(&unary_reference(&op, &x).unwrap());
            for ((&g, &w), &xv) in got.iter().zip(&want).zip(&xs) {
                // fastmath's documented bounds: a few ulp (6e-6 relative for
                // GELU), erf 2.5e-7 absolute; tiny results absolutely.
                let abs = match op {
                    UnaryOp::Erf => 2.5e-7,
                    // x/6 + 1/2 cancels near -3 (in both kernels).
                    UnaryOp::HardSwish => 1e-7,
                    // GELU's tails below 1e-10 lose relative accuracy
                    // (see fastmath's table).
                    UnaryOp::Gelu { .. } => 1e-10,
                    _ => 1e-30,
                };
                let ok =
                    (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= 6e-6 * w.abs() + abs;
                assert!(ok, "{op:?}({xv:e}) = {g:e}, reference {w:e}");
            }
        }
        // Clip's fast path is exact, NaN passes, bounds optional.
        let c = Tensor::vector(vec![-2.0f32, 0.5, 7.0, f32::NAN, -0.0]);
        let lo = Tensor::scalar(0.0f32);
        let hi = Tensor::scalar(6.0f32);
        let y = vals::<f32>(&clip(&c, Some(&lo), Some(&hi)).unwrap());
        assert_eq!(&y[..3], &[0.0, 0.5, 6.0]);
        assert!(y[3].is_nan() && y[4] == 0.0);
        let y = vals::<f32>(&clip(&c, None, Some(&hi)).unwrap());
        assert_eq!(&y[..3], &[-2.0, 0.5, 6.0]);
        let y = vals::<f32>(&clip(&c, Some(&hi), Some(&lo)).unwrap());
        assert_eq!(&y[..3], &[0.0, 0.0, 0.0], "min > max gives max");
    }

    /// Prints before/after times for typical model shapes.
    /// `cargo test --release -p kiln-cpu --lib elementwise_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn elementwise_speed() {
        fn best(f: &mut dyn FnMut()) -> f64 {
            let mut b = f64::INFINITY;
            for _ in 0..15 {
                let t0 = std::time::Instant::now();
                f();
                b = b.min(t0.elapsed().as_secs_f64());
            }
            b * 1e6
        }
        let x = t(&[128, 3072], rand_f32(128 * 3072, 1));
        let bias = t(&[3072], rand_f32(3072, 2));
        for op in [
            UnaryOp::Gelu { tanh_approx: false },
            UnaryOp::Gelu { tanh_approx: true },
            UnaryOp::Erf,
            UnaryOp::Sigmoid,
            UnaryOp::Tanh,
            UnaryOp::Relu,
        ] {
            let fast = best(&mut || drop(un(op.clone(), &x)));
            let refr = best(&mut || drop(unary_reference(&op, &x).unwrap()));
            eprintln!("{op:?} [128,3072]: reference {refr:.0} us, fast {fast:.0} us");
        }
        let fast = best(&mut || drop(fast_bin(BinaryOp::Add, &x, &bias)));
        let refr = best(&mut || drop(binary_reference(BinaryOp::Add, &x, &bias)));
        eprintln!("Add [128,3072]+[3072]: reference {refr:.0} us, fast {fast:.0} us");
        let fast = best(&mut || drop(fast_bin(BinaryOp::Add, &x, &x)));
        let refr = best(&mut || drop(binary_reference(BinaryOp::Add, &x, &x)));
        eprintln!("Add [128,3072]+[128,3072]: reference {refr:.0} us, fast {fast:.0} us");
        let y = t(&[1, 64, 112, 112], rand_f32(64 * 112 * 112, 3));
        let ch = t(&[64, 1, 1], rand_f32(64, 4));
        let fast = best(&mut || drop(fast_bin(BinaryOp::Mul, &y, &ch)));
        let refr = best(&mut || drop(binary_reference(BinaryOp::Mul, &y, &ch)));
        eprintln!("Mul [1,64,112,112]*[64,1,1]: reference {refr:.0} us, fast {fast:.0} us");
    }
}
