//! Fast f32 math for activations and other element-wise functions: exp, tanh,
//! sigmoid, erf and the activations built on them (GELU in both forms, SiLU,
//! HardSwish, ...), over whole slices.
//!
//! Each function is written once, branch-free, as a scalar `*_k` kernel over
//! plain f32 arithmetic and bit operations. The slice drivers run those kernels
//! in loops compiled three times: with AVX-512 (F/DQ/BW/VL + FMA), with
//! AVX2 + FMA, and for the portable baseline; the CPU's level is detected once at
//! run time and every `#[target_feature]` function is called only after that
//! check. LLVM vectorizes the loops (every kernel is straight-line code with
//! selects), so the three builds compute the same formulas, with or without
//! fused multiply-adds.
//!
//! Accuracy against the f64 `std` functions (checked by the tests below over
//! dense sweeps incl. large |x|, +-0, +-inf, NaN and subnormals; relative error
//! unless said otherwise):
//!
//! | function | bound |
//! |---|---|
//! | `exp` | 3 ulp for normal results; abs 2 ulp of the smallest normal below |
//! | `tanh` | 4 ulp |
//! | `sigmoid` | 4 ulp for results >= 1e-30 (x >= -69), abs 1e-37 below |
//! | `silu` | 5 ulp (abs 1e-37 where the result is below 1e-30) |
//! | `erf` | abs 2.5e-7, and 4 ulp for \|x\| < 0.5 |
//! | `gelu_erf` | 50 ulp (<= 6e-6 relative) for results of magnitude >= 1e-10 (x > -6.4), 1e-10 absolute below: no cancellation in the negative tail, but the rounding of exp's argument costs ~x^2 ulp there |
//! | `gelu_tanh` | 50 ulp, or 1e-10 absolute |
//! | `hardswish` | 2 ulp, or 1e-7 absolute near x = -3 (x/6 + 1/2 cancels) |
//!
//! The conformance tolerance is rtol 1e-3 / atol 1e-7, and whole models are
//! compared to ONNX Runtime at 1e-4 relative, so these bounds are two to three
//! orders of magnitude inside them. NaN in gives NaN out everywhere; +-inf give
//! the limits (or NaN where the reference formula itself gives NaN, as
//! `-inf * 0` in GELU/SiLU at -inf).
//!
//! `fused_act` applies a [`FusedAct`] in place; its reference is
//! [`FusedAct::eval`]. One deliberate difference: `Clip` lets NaN through (as
//! the Clip op does) where `eval` maps it to `min`.

use kiln_ir::FusedAct;

// ---------------------------------------------------------------------------
// Scalar kernels (inlined into the SIMD loops)
// ---------------------------------------------------------------------------

/// `a * b + c`, fused when `FMA` (only instantiated with `FMA = true` inside
/// functions compiled with the `fma` feature, or in tests, where `mul_add` is
/// merely slow).
#[inline(always)]
fn mad<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Adding then subtracting 1.5 * 2^23 rounds an f32 of magnitude < 2^22 to the
/// nearest integer; the low bits of the sum hold that integer.
const SHIFTER: f32 = 12_582_912.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cephes): `LN2_HI` has few mantissa bits so `n * LN2_HI`
/// is exact for the |n| <= 150 used here.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x: 0 below -104, +inf from 89 (computed at 89), NaN passes; beyond
/// those e^x is 0 or +inf in f32. The power of two is applied in two halves so that results
/// in the subnormal range and up to f32::MAX come out right.
#[inline(always)]
fn exp_k<const FMA: bool>(x: f32) -> f32 {
    // Below -104 the result is 0. Those lanes compute e^0 instead and are
    // zeroed after: computing them at -104 ended in a multiply with an
    // underflowing result, which the CPU finishes slowly (attention's
    // masked scores, -3.4e38 or -inf, took the softmax's exp from 15% to 30%
    // of GPT-2's causal attention). Above 89 it is +inf, from 89.
    let tiny = x < -104.0;
    let x = if tiny {
        0.0
    } else if x > 89.0 {
        89.0
    } else {
        x
    };
    let t = mad::<FMA>(x, LOG2E, SHIFTER);
    let n = t - SHIFTER;
    let ni = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let r = mad::<FMA>(n, -LN2_HI, x);
    let r = mad::<FMA>(n, -LN2_LO, r);
    // Cephes expf polynomial: e^r = 1 + r + r^2 * P(r) on |r| <= ln2 / 2.
    let mut p = 1.987_569_1e-4f32;
    p = mad::<FMA>(p, r, 1.398_199_9e-3);
    p = mad::<FMA>(p, r, 8.333_452e-3);
    p = mad::<FMA>(p, r, 4.166_579_6e-2);
    p = mad::<FMA>(p, r, 1.666_666_5e-1);
    p = mad::<FMA>(p, r, 5.000_000_1e-1);
    let e = mad::<FMA>(p, r * r, r) + 1.0;
    // n in [-150, 129]; each half is a normal power of two.
    let n1 = ni >> 1;
    let n2 = ni.wrapping_sub(n1);
    let s1 = f32::from_bits((n1.wrapping_add(127) as u32).wrapping_shl(23));
    let s2 = f32::from_bits((n2.wrapping_add(127) as u32).wrapping_shl(23));
    if tiny {
        0.0
    } else {
        e * s1 * s2
    }
}

/// tanh: an odd polynomial below 0.625 (Cephes tanhf), `1 - 2 / (e^2|x| + 1)`
/// above, with x's sign.
#[inline(always)]
fn tanh_k<const FMA: bool>(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let mut p = -5.704_988_7e-3f32;
    p = mad::<FMA>(p, z, 2.063_908_9e-2);
    p = mad::<FMA>(p, z, -5.373_971_6e-2);
    p = mad::<FMA>(p, z, 1.333_144_2e-1);
    p = mad::<FMA>(p, z, -3.333_328_2e-1);
    let small = mad::<FMA>(p * z, x, x);
    let e = exp_k::<FMA>(a + a);
    let big = (1.0 - 2.0 / (e + 1.0)).copysign(x);
    if a < 0.625 {
        // copysign keeps tanh(-0.0) = -0.0 (the polynomial's sum gives +0).
        small.copysign(x)
    } else {
        big
    }
}

/// 1 / (1 + e^-x), from e = e^-|x| so that both tails keep their relative
/// accuracy: `1 / (1 + e)` for x >= 0, `e / (1 + e)` below.
#[inline(always)]
fn sigmoid_k<const FMA: bool>(x: f32) -> f32 {
    let e = exp_k::<FMA>(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 {
        s
    } else {
        e * s
    }
}

/// erfc(z) for z >= 0 (NaN passes) with small *relative* error everywhere:
/// Numerical Recipes' Chebyshev fit `t * exp(-z^2 + P(t))`, t = 1 / (1 + z/2),
/// fractional error < 1.2e-7 in exact arithmetic; the f32 evaluation adds the
/// rounding of the exponent's argument (|arg| ulp, about 1e-6 relative at z = 4).
#[inline(always)]
fn erfc_pos_k<const FMA: bool>(z: f32) -> f32 {
    let t = 1.0 / mad::<FMA>(0.5, z, 1.0);
    let mut p = 0.170_872_77f32;
    p = mad::<FMA>(p, t, -0.822_152_23);
    p = mad::<FMA>(p, t, 1.488_515_9);
    p = mad::<FMA>(p, t, -1.135_203_98);
    p = mad::<FMA>(p, t, 0.278_868_07);
    p = mad::<FMA>(p, t, -0.186_288_06);
    p = mad::<FMA>(p, t, 0.096_784_18);
    p = mad::<FMA>(p, t, 0.374_091_96);
    p = mad::<FMA>(p, t, 1.000_023_7);
    p = mad::<FMA>(p, t, -1.265_512_2);
    t * exp_k::<FMA>(mad::<FMA>(-z, z, p))
}

/// erf: its Maclaurin series (degree 13, odd) below 0.5, `1 - erfc(|x|)` above.
#[inline(always)]
fn erf_k<const FMA: bool>(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    // 2/sqrt(pi) * (-1)^n / (n! (2n+1)), n = 6 down to 0.
    let mut p = 1.205_533_3e-4f32;
    p = mad::<FMA>(p, z, -8.548_327e-4);
    p = mad::<FMA>(p, z, 5.223_977_6e-3);
    p = mad::<FMA>(p, z, -2.686_617e-2);
    p = mad::<FMA>(p, z, 1.128_379_2e-1);
    p = mad::<FMA>(p, z, -3.761_263_9e-1);
    p = mad::<FMA>(p, z, 1.128_379_2);
    let small = p * x;
    let big = (1.0 - erfc_pos_k::<FMA>(a)).copysign(x);
    if a < 0.5 {
        small
    } else {
        big
    }
}

/// `x * Phi(x)` with `Phi(x) = 1 - erfc(x / sqrt 2) / 2` for x >= 0 and
/// `erfc(-x / sqrt 2) / 2` below, so the negative tail keeps its relative
/// accuracy (`1 + erf(..)` would cancel).
#[inline(always)]
fn gelu_erf_k<const FMA: bool>(x: f32) -> f32 {
    let h = 0.5 * erfc_pos_k::<FMA>(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
    let phi = if x >= 0.0 { 1.0 - h } else { h };
    x * phi
}

/// `0.5 x (1 + tanh(u)) = x * sigmoid(2u)`, `u = sqrt(2/pi) (x + 0.044715 x^3)`.
#[inline(always)]
fn gelu_tanh_k<const FMA: bool>(x: f32) -> f32 {
    // 2 * sqrt(2 / pi) and 2 * sqrt(2 / pi) * 0.044715.
    const C1: f32 = 1.595_769_1;
    const C3: f32 = 0.071_354_82;
    let u2 = x * mad::<FMA>(C3, x * x, C1);
    x * sigmoid_k::<FMA>(u2)
}

/// Clamps to [0, 1], letting NaN through.
#[inline(always)]
fn clamp01(v: f32) -> f32 {
    v.clamp(0.0, 1.0)
}

// ---------------------------------------------------------------------------
// Functions over slices
// ---------------------------------------------------------------------------

/// An element-wise f32 function this module computes fast.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Func {
    Identity,
    /// `x < 0 ? 0 : x` (NaN and -0.0 pass through).
    Relu,
    /// `x < 0 ? alpha * x : x`.
    LeakyRelu {
        alpha: f32,
    },
    /// `x < min ? min : x`, then `> max ? max : ..` (NaN passes; min > max
    /// gives max, like the Clip op).
    Clip {
        min: f32,
        max: f32,
    },
    /// `clamp(alpha * x + beta, 0, 1)`.
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// `x * clamp(x / 6 + 1/2, 0, 1)`.
    HardSwish,
    Exp,
    Tanh,
    Sigmoid,
    Erf,
    /// `x * sigmoid(x)`.
    Silu,
    /// `0.5 x (1 + erf(x / sqrt 2))`.
    GeluErf,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    GeluTanh,
}

impl From<FusedAct> for Func {
    fn from(act: FusedAct) -> Func {
        match act {
            FusedAct::Identity => Func::Identity,
            FusedAct::Relu => Func::Relu,
            FusedAct::Clip { min, max } => Func::Clip { min, max },
            FusedAct::Sigmoid => Func::Sigmoid,
            FusedAct::Tanh => Func::Tanh,
            FusedAct::HardSigmoid { alpha, beta } => Func::HardSigmoid { alpha, beta },
            FusedAct::HardSwish => Func::HardSwish,
            FusedAct::LeakyRelu { alpha } => Func::LeakyRelu { alpha },
            FusedAct::GeluErf => Func::GeluErf,
            FusedAct::GeluTanh => Func::GeluTanh,
            FusedAct::Silu => Func::Silu,
        }
    }
}

/// Expands `$lp!(closure)` for the kernel of `$func`, built with `$fma`.
macro_rules! per_func {
    ($func:expr, $fma:ident, $lp:ident) => {
        match $func {
            Func::Identity => $lp!(|x: f32| x),
            Func::Relu => $lp!(|x: f32| if x < 0.0 { 0.0 } else { x }),
            Func::LeakyRelu { alpha } => $lp!(|x: f32| if x < 0.0 { alpha * x } else { x }),
            Func::Clip { min, max } => $lp!(|x: f32| {
                let r = if x < min { min } else { x };
                if r > max {
                    max
                } else {
                    r
                }
            }),
            Func::HardSigmoid { alpha, beta } => $lp!(|x: f32| clamp01(alpha * x + beta)),
            Func::HardSwish => $lp!(|x: f32| x * clamp01(x * (1.0 / 6.0) + 0.5)),
            Func::Exp => $lp!(exp_k::<$fma>),
            Func::Tanh => $lp!(tanh_k::<$fma>),
            Func::Sigmoid => $lp!(sigmoid_k::<$fma>),
            Func::Erf => $lp!(erf_k::<$fma>),
            Func::Silu => $lp!(|x: f32| x * sigmoid_k::<$fma>(x)),
            Func::GeluErf => $lp!(gelu_erf_k::<$fma>),
            Func::GeluTanh => $lp!(gelu_tanh_k::<$fma>),
        }
    };
}

/// `x = f(x)` over `v`, in blocks of 64 floats: the vector loop then
/// has four independent chains per step, where one chain a step left the
/// long functions waiting on their own latency (one thread: exp 10.5 ->
/// 9.4, GELU (erf) 38 -> 30 cycles per 16 floats).
#[inline(always)]
fn blocked_for_each(v: &mut [f32], f: impl Fn(f32) -> f32) {
    let mut blocks = v.chunks_exact_mut(64);
    for blk in &mut blocks {
        for x in blk.iter_mut() {
            *x = f(*x);
        }
    }
    for x in blocks.into_remainder() {
        *x = f(*x);
    }
}

#[inline(always)]
fn inplace_generic<const FMA: bool>(func: Func, v: &mut [f32]) {
    macro_rules! lp {
        ($f:expr) => {{
            blocked_for_each(v, $f);
        }};
    }
    per_func!(func, FMA, lp)
}

#[inline(always)]
fn map_generic<const FMA: bool>(func: Func, src: &[f32], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "fastmath::map: length mismatch");
    macro_rules! lp {
        ($f:expr) => {{
            let f = $f;
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = f(s);
            }
        }};
    }
    per_func!(func, FMA, lp)
}

/// The vector instruction sets the loops here are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Portable,
    Avx2Fma,
    Avx512,
}

/// The best level this CPU supports (detected once).
pub fn level() -> Level {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(0);
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Portable,
        2 => Level::Avx2Fma,
        3 => Level::Avx512,
        _ => {
            let l = detect();
            let code = match l {
                Level::Portable => 1,
                Level::Avx2Fma => 2,
                Level::Avx512 => 3,
            };
            LEVEL.store(code, Ordering::Relaxed);
            l
        }
    }
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2Fma;
        }
    }
    Level::Portable
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn inplace_avx512(func: Func, v: &mut [f32]) {
        inplace_generic::<true>(func, v)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn inplace_avx2(func: Func, v: &mut [f32]) {
        inplace_generic::<true>(func, v)
    }
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn map_avx512(func: Func, src: &[f32], dst: &mut [f32]) {
        map_generic::<true>(func, src, dst)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn map_avx2(func: Func, src: &[f32], dst: &mut [f32]) {
        map_generic::<true>(func, src, dst)
    }
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn call_avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
    /// [`sum_of`] in AVX-512 intrinsics, the same partial sums added in
    /// the same order (the portable loop compiled to 128-bit adds and
    /// shuffles).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sum_avx512(v: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let mut acc = _mm512_setzero_ps();
        let chunks = v.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            // SAFETY: `c` holds 16 floats.
            acc = _mm512_add_ps(acc, unsafe { _mm512_loadu_ps(c.as_ptr()) });
        }
        let mut s = [0f32; 16];
        // SAFETY: `s` holds 16 floats.
        unsafe { _mm512_storeu_ps(s.as_mut_ptr(), acc) };
        sum_lanes(&s, tail)
    }
    /// [`max_of`] in AVX-512 intrinsics: written out, because the portable
    /// loop's NaN flag compiled to shuffles and a scalar `or` per step (a
    /// third of a softmax row's time in attention).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max_avx512(v: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut nan: __mmask16 = 0;
        let chunks = v.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            // SAFETY: `c` holds 16 floats.
            let x = unsafe { _mm512_loadu_ps(c.as_ptr()) };
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            m = _mm512_max_ps(m, x);
        }
        if !rest.is_empty() {
            let live: __mmask16 = (1u16 << rest.len()) - 1;
            // SAFETY: the masked load reads only the `rest.len()` live floats.
            let x = unsafe {
                _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), live, rest.as_ptr())
            };
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            m = _mm512_max_ps(m, x);
        }
        if nan != 0 {
            return f32::NAN;
        }
        _mm512_reduce_max_ps(m)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn call_avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
    /// [`sum_f64`] (`dev` None) or [`sum_sq_dev_f64`] (`dev` the mean):
    /// 32 floats a step into four f64 vectors, then 8 a step into the
    /// first, then the last few under a mask; the vectors added pairwise.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub(super) unsafe fn sums_f64_avx512(v: &[f32], dev: Option<f64>) -> f64 {
        use std::arch::x86_64::*;
        let mean = _mm512_set1_pd(dev.unwrap_or(0.0));
        // One step: 8 floats (`live` of them) into `acc`.
        let add = |acc: __m512d, x: __m256, live: __mmask8| {
            let x = _mm512_cvtps_pd(x);
            match dev {
                None => _mm512_mask_add_pd(acc, live, acc, x),
                Some(_) => {
                    let d = _mm512_sub_pd(x, mean);
                    _mm512_mask3_fmadd_pd(d, d, acc, live)
                }
            }
        };
        let mut acc = [_mm512_setzero_pd(); 4];
        let mut chunks = v.chunks_exact(32);
        for c in &mut chunks {
            for (q, a) in acc.iter_mut().enumerate() {
                // SAFETY: `c` holds 32 floats.
                *a = add(*a, unsafe { _mm256_loadu_ps(c.as_ptr().add(q * 8)) }, !0);
            }
        }
        let mut eights = chunks.remainder().chunks_exact(8);
        for c in &mut eights {
            // SAFETY: `c` holds 8 floats.
            acc[0] = add(acc[0], unsafe { _mm256_loadu_ps(c.as_ptr()) }, !0);
        }
        let rest = eights.remainder();
        if !rest.is_empty() {
            let live: __mmask8 = (1u8 << rest.len()) - 1;
            // SAFETY: the masked load reads only the `rest.len()` floats;
            // the lanes past them are not added.
            let x = unsafe { _mm256_maskz_loadu_ps(live, rest.as_ptr()) };
            acc[1] = add(acc[1], x, live);
        }
        let s = _mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3]));
        _mm512_reduce_add_pd(s)
    }
}

/// Applies `func` to every value of `v` in place, at `lvl` (which must not
/// exceed [`level()`]; tests use it to check every build).
fn apply_inplace_at(lvl: Level, func: Func, v: &mut [f32]) {
    assert!(
        lvl_ok(lvl),
        "fastmath: {lvl:?} is not supported by this CPU"
    );
    match lvl {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: lvl_ok checked that the CPU has AVX-512 F/DQ/BW/VL + AVX2 + FMA.
        Level::Avx512 => unsafe { x86::inplace_avx512(func, v) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: lvl_ok checked that the CPU has AVX2 + FMA.
        Level::Avx2Fma => unsafe { x86::inplace_avx2(func, v) },
        _ => inplace_generic::<false>(func, v),
    }
}

fn map_at(lvl: Level, func: Func, src: &[f32], dst: &mut [f32]) {
    assert!(
        lvl_ok(lvl),
        "fastmath: {lvl:?} is not supported by this CPU"
    );
    match lvl {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: lvl_ok checked that the CPU has AVX-512 F/DQ/BW/VL + AVX2 + FMA.
        Level::Avx512 => unsafe { x86::map_avx512(func, src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: lvl_ok checked that the CPU has AVX2 + FMA.
        Level::Avx2Fma => unsafe { x86::map_avx2(func, src, dst) },
        _ => map_generic::<false>(func, src, dst),
    }
}

fn lvl_ok(lvl: Level) -> bool {
    let rank = |l: Level| match l {
        Level::Portable => 0,
        Level::Avx2Fma => 1,
        Level::Avx512 => 2,
    };
    rank(lvl) <= rank(level())
}

/// Applies `func` to every value of `v` in place (single-threaded).
pub fn apply_inplace(func: Func, v: &mut [f32]) {
    apply_inplace_at(level(), func, v)
}

/// `dst[i] = func(src[i])` (single-threaded). Panics if the lengths differ.
pub fn map(func: Func, src: &[f32], dst: &mut [f32]) {
    map_at(level(), func, src, dst)
}

/// Below this many elements the parallel versions run on the calling thread.
pub const PAR_MIN: usize = 64 * 1024;
/// Elements per parallel task.
pub const PAR_CHUNK: usize = 16 * 1024;

/// `func` over `src` into a new vector, in parallel chunks when large.
pub fn map_vec(func: Func, src: &[f32]) -> Vec<f32> {
    // `map` writes every element.
    let mut out = crate::buffers::take_f32(src.len());
    if src.len() < PAR_MIN {
        map(func, src, &mut out);
    } else {
        use rayon::prelude::*;
        out.par_chunks_mut(PAR_CHUNK)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(d, s)| map(func, s, d));
    }
    out
}

/// Runs `f` inside a function compiled for the best vector level of this CPU,
/// so that loops in `f` are vectorized for it once `f` is inlined there.
/// Pass closures as `simd(#[inline(always)] || ...)`: a big closure is
/// otherwise compiled on its own, for the baseline ISA (pooling and layer
/// norm ran on SSE2 that way). `f` must compute the same result at any level; use it
/// for plain loops (sums, maxima, axpy), not for code that depends on FMA
/// rounding.
#[inline]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() detected AVX-512 F/DQ/BW/VL + AVX2 + FMA on this CPU.
        Level::Avx512 => unsafe { x86::call_avx512(f) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() detected AVX2 + FMA on this CPU.
        Level::Avx2Fma => unsafe { x86::call_avx2(f) },
        _ => f(),
    }
}

/// Applies `act` to every value of `vals` in place (single-threaded: it is
/// meant for kernel epilogues that are already parallel).
pub fn fused_act(act: FusedAct, vals: &mut [f32]) {
    if act == FusedAct::Identity {
        return;
    }
    apply_inplace(act.into(), vals)
}

/// e^x for every value, in place.
pub fn exp_inplace(v: &mut [f32]) {
    apply_inplace(Func::Exp, v)
}
/// tanh for every value, in place.
pub fn tanh_inplace(v: &mut [f32]) {
    apply_inplace(Func::Tanh, v)
}
/// 1 / (1 + e^-x) for every value, in place.
pub fn sigmoid_inplace(v: &mut [f32]) {
    apply_inplace(Func::Sigmoid, v)
}
/// erf for every value, in place.
pub fn erf_inplace(v: &mut [f32]) {
    apply_inplace(Func::Erf, v)
}
/// x * sigmoid(x) for every value, in place.
pub fn silu_inplace(v: &mut [f32]) {
    apply_inplace(Func::Silu, v)
}
/// GELU (erf form) for every value, in place.
pub fn gelu_erf_inplace(v: &mut [f32]) {
    apply_inplace(Func::GeluErf, v)
}
/// GELU (tanh approximation) for every value, in place.
pub fn gelu_tanh_inplace(v: &mut [f32]) {
    apply_inplace(Func::GeluTanh, v)
}
/// HardSwish for every value, in place.
pub fn hardswish_inplace(v: &mut [f32]) {
    apply_inplace(Func::HardSwish, v)
}

/// Scalar e^x (portable build of the same kernel).
pub fn exp(x: f32) -> f32 {
    exp_k::<false>(x)
}
/// Scalar tanh.
pub fn tanh(x: f32) -> f32 {
    tanh_k::<false>(x)
}
/// Scalar sigmoid.
pub fn sigmoid(x: f32) -> f32 {
    sigmoid_k::<false>(x)
}
/// Scalar erf.
pub fn erf(x: f32) -> f32 {
    erf_k::<false>(x)
}

// ---------------------------------------------------------------------------
// Row helpers for softmax-like kernels
// ---------------------------------------------------------------------------

/// Maximum of `v` (NaN if any value is NaN; -inf for an empty slice).
#[inline]
pub fn max_of(v: &[f32]) -> f32 {
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() detected AVX-512F on this CPU.
        Level::Avx512 => unsafe { x86::max_avx512(v) },
        _ => max_generic(v),
    }
}

#[inline(always)]
fn max_generic(v: &[f32]) -> f32 {
    // Sixteen independent lanes so the loop vectorizes; NaN is tracked apart
    // because the lane maxima below drop it.
    let mut m = [f32::NEG_INFINITY; 16];
    let mut nan = false;
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            let x = c[i];
            nan |= x.is_nan();
            m[i] = if x > m[i] { x } else { m[i] };
        }
    }
    for &x in chunks.remainder() {
        nan |= x.is_nan();
        m[0] = if x > m[0] { x } else { m[0] };
    }
    if nan {
        return f32::NAN;
    }
    m.iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Partial sums of [`sum_f64_by`]: four vectors of f64 on AVX-512, so the
/// adds do not wait on each other (one vector's chain made LayerNorm's
/// statistics latency-bound).
const F64_SUMS: usize = 32;

/// Sum of `v` accumulated in f64: [`sum_f64_by`], or on AVX-512 the same
/// sum in intrinsics (as in [`sum_sq_dev_f64`]; the partial sums are
/// grouped differently, so the last bits may differ). LayerNorm's mean,
/// ReduceSum/ReduceMean over contiguous runs and global average pooling use
/// it.
#[inline(always)]
pub fn sum_f64(v: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        // SAFETY: level() detected AVX-512F and VL.
        return unsafe { x86::sums_f64_avx512(v, None) };
    }
    sum_f64_by(v, |x| x as f64)
}

/// Sum of `(x - mean)^2` over `v`, accumulated in f64. On AVX-512 in
/// intrinsics, 8 doubles per vector and four vectors of partial sums: the
/// portable form ([`sum_f64_by`]) compiled to 2-double (128-bit) converts
/// and adds, and LayerNorm's statistics took most of its time (BERT's
/// 128 x 768 rows: 39 us a LayerNorm on one thread).
#[inline(always)]
pub fn sum_sq_dev_f64(v: &[f32], mean: f64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 {
        // SAFETY: level() detected AVX-512F and VL.
        return unsafe { x86::sums_f64_avx512(v, Some(mean)) };
    }
    sum_f64_by(v, |x| {
        let d = x as f64 - mean;
        d * d
    })
}

/// Sum of `f` over `v`, accumulated in f64: [`F64_SUMS`] independent lanes
/// over runs of that many values, then 8 lanes over the rest's runs of 8,
/// then the last few in order, the lanes folded pairwise. Inlined, so it
/// vectorizes at its caller's width (`simd`), and short rows (a 7x7 pooling
/// window) do not end in a long scalar tail.
#[inline(always)]
pub fn sum_f64_by(v: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; F64_SUMS];
    let mut chunks = v.chunks_exact(F64_SUMS);
    for c in &mut chunks {
        for i in 0..F64_SUMS {
            acc[i] += f(c[i]);
        }
    }
    let mut eights = chunks.remainder().chunks_exact(8);
    for c in &mut eights {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    let mut width = F64_SUMS;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    eights.remainder().iter().fold(acc[0], |s, &x| s + f(x))
}

/// Sum of `v` in 16 interleaved partial sums (pairwise-ish, and vectorizable).
#[inline]
pub fn sum_of(v: &[f32]) -> f32 {
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() detected AVX-512F on this CPU.
        Level::Avx512 => unsafe { x86::sum_avx512(v) },
        _ => sum_generic(v),
    }
}

#[inline(always)]
fn sum_generic(v: &[f32]) -> f32 {
    let mut s = [0.0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            s[i] += c[i];
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    sum_lanes(&s, tail)
}

/// The 16 partial sums and the tail's sum, added in a fixed order.
#[inline(always)]
fn sum_lanes(s: &[f32; 16], tail: f32) -> f32 {
    let mut h = [0.0f32; 8];
    for i in 0..8 {
        h[i] = s[i] + s[i + 8];
    }
    ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7])) + tail
}

/// `v[i] = exp(v[i] - shift)`, returning the sum of the results (the inner
/// loop of softmax). Single-threaded, at the CPU's best level.
pub fn exp_shift_sum(v: &mut [f32], shift: f32) -> f32 {
    #[inline(always)]
    fn body<const FMA: bool>(v: &mut [f32], shift: f32) -> f32 {
        blocked_for_each(v, |x| exp_k::<FMA>(x - shift));
        sum_of(v)
    }
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() detected AVX-512 F/DQ/BW/VL + AVX2 + FMA.
        Level::Avx512 => unsafe { x86::call_avx512(|| body::<true>(v, shift)) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: level() detected AVX2 + FMA.
        Level::Avx2Fma => unsafe { x86::call_avx2(|| body::<true>(v, shift)) },
        _ => body::<false>(v, shift),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sum_f64` and `sum_f64_by` against a plain sum in order, on every
    /// length up to past two runs of 32 (each path: runs of 32, of 8, the
    /// last few, and their mixes) of mixed magnitudes and signs.
    #[test]
    fn f64_sums_match_a_plain_sum_at_every_length() {
        let vals: Vec<f32> = (0..100)
            .map(|i| {
                let m = [1e-3f32, 1.0, 1e4][i % 3];
                m * ((i * 37 % 19) as f32 - 9.0)
            })
            .collect();
        for len in 0..vals.len() {
            let v = &vals[..len];
            let plain: f64 = v.iter().map(|&x| x as f64).sum();
            let sq: f64 = v.iter().map(|&x| (x as f64 - 0.5).powi(2)).sum();
            let sums = [
                (sum_f64(v), sum_sq_dev_f64(v, 0.5)),
                (
                    sum_f64_by(v, |x| x as f64),
                    sum_f64_by(v, |x| (x as f64 - 0.5).powi(2)),
                ),
            ];
            for (got, got_sq) in sums {
                assert!(
                    (got - plain).abs() <= 1e-9 * (1.0 + plain.abs()),
                    "len {len}: {got} vs {plain}"
                );
                assert!(
                    (got_sq - sq).abs() <= 1e-9 * sq.max(1.0),
                    "len {len}: {got_sq} vs {sq}"
                );
            }
        }
        // Values near a big mean: the deviations are small, so a lane past
        // the end counted by mistake (adding mean^2 = 1e6) cannot hide.
        let near: Vec<f32> = (0..100).map(|i| 1000.0 + (i % 7) as f32 * 0.25).collect();
        for len in 0..near.len() {
            let v = &near[..len];
            let sq: f64 = v.iter().map(|&x| (x as f64 - 1000.0).powi(2)).sum();
            for got in [
                sum_sq_dev_f64(v, 1000.0),
                sum_f64_by(v, |x| (x as f64 - 1000.0).powi(2)),
            ] {
                assert!((got - sq).abs() <= 1e-9, "len {len}: {got} vs {sq}");
            }
        }
    }

    /// Every level this CPU can run, so each build of the kernels is tested.
    fn levels() -> Vec<Level> {
        [Level::Portable, Level::Avx2Fma, Level::Avx512]
            .into_iter()
            .filter(|&l| lvl_ok(l))
            .collect()
    }

    /// A dense sweep of [-lim, lim] plus the special values.
    fn sweep(lim: f32, n: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..=n)
            .map(|i| -lim + 2.0 * lim * (i as f32) / (n as f32))
            .collect();
        v.extend([
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            1e-30,
            -1e-30,
            1e-8,
            -1e-8,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        // Every power of two and its neighbours, both signs.
        for e in -149..128 {
            let p = 2f64.powi(e) as f32;
            for q in [p, p * 1.1, p * 0.9] {
                v.push(q);
                v.push(-q);
            }
        }
        v
    }

    fn ulp(x: f64) -> f64 {
        let f = (x as f32).abs();
        if f == 0.0 || f < f32::MIN_POSITIVE {
            return f32::MIN_POSITIVE as f64 * f32::EPSILON as f64;
        }
        (f32::from_bits(f.to_bits() + 1) - f) as f64
    }

    /// Checks `func` at every level against `reference` on `xs`: the result
    /// must be NaN exactly when the reference is, equal on infinities, and
    /// otherwise within `ulps` ulp of the reference or `abs` absolutely.
    /// Returns the worst error in ulps seen (for the message).
    fn check(func: Func, xs: &[f32], reference: impl Fn(f64) -> f64, ulps: f64, abs: f64) {
        for lvl in levels() {
            let mut got = xs.to_vec();
            apply_inplace_at(lvl, func, &mut got);
            let mut mapped = vec![0.0; xs.len()];
            map_at(lvl, func, xs, &mut mapped);
            let mut worst = 0.0f64;
            for ((&x, &g), &m) in xs.iter().zip(&got).zip(&mapped) {
                assert_eq!(g.to_bits(), m.to_bits(), "{func:?} map vs inplace at {x}");
                let want = reference(x as f64);
                if want.is_nan() {
                    assert!(g.is_nan(), "{func:?}({x}) = {g}, want NaN ({lvl:?})");
                    continue;
                }
                assert!(!g.is_nan(), "{func:?}({x}) = NaN, want {want} ({lvl:?})");
                if want.is_infinite() || (want as f32).is_infinite() {
                    assert_eq!(g, want as f32, "{func:?}({x}) ({lvl:?})");
                    continue;
                }
                let err = (g as f64 - want).abs();
                let in_ulps = err / ulp(want);
                if err > abs {
                    worst = worst.max(in_ulps);
                    assert!(
                        in_ulps <= ulps,
                        "{func:?}({x:e}) = {g:e}, want {want:e}: {in_ulps:.2} ulp, abs {err:e} ({lvl:?})"
                    );
                }
            }
            eprintln!("{func:?} {lvl:?}: worst {worst:.2} ulp (outside abs {abs:e})");
        }
    }

    fn erf64(x: f64) -> f64 {
        crate::elementwise::erf(x)
    }

    #[test]
    fn exp_within_3_ulp() {
        let xs = sweep(110.0, 400_000);
        // Subnormal results are checked to 2 ulp of the smallest normal.
        check(Func::Exp, &xs, f64::exp, 3.0, 2.0 * 1.2e-38 * 1.2e-7);
        let dense = sweep(1.0, 200_000);
        check(Func::Exp, &dense, f64::exp, 3.0, 0.0);
    }

    #[test]
    fn exp_edges() {
        for lvl in levels() {
            let mut v = vec![
                0.0,
                -0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                88.72,
                88.73,
                -103.0,
                -200.0,
            ];
            apply_inplace_at(lvl, Func::Exp, &mut v);
            assert_eq!(v[0], 1.0);
            assert_eq!(v[1], 1.0);
            assert_eq!(v[2], f32::INFINITY);
            assert_eq!(v[3], 0.0);
            assert!(v[4].is_nan());
            assert!(v[5].is_finite() && v[5] > 3.0e38);
            assert_eq!(v[6], f32::INFINITY);
            assert!(v[7] > 0.0 && v[7] < 1e-44, "exp(-103) = {}", v[7]);
            assert_eq!(v[8], 0.0);
        }
    }

    #[test]
    fn tanh_within_4_ulp() {
        check(Func::Tanh, &sweep(20.0, 400_000), f64::tanh, 4.0, 0.0);
        check(Func::Tanh, &sweep(1.0, 200_000), f64::tanh, 4.0, 0.0);
        let mut z = [-0.0f32, 0.0];
        tanh_inplace(&mut z);
        assert!(z[0] == 0.0 && z[0].is_sign_negative() && z[1].is_sign_positive());
    }

    fn sig64(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn sigmoid_within_4_ulp() {
        check(Func::Sigmoid, &sweep(120.0, 400_000), sig64, 4.0, 1e-37);
        check(Func::Sigmoid, &sweep(2.0, 200_000), sig64, 4.0, 0.0);
    }

    #[test]
    fn silu_within_5_ulp() {
        check(
            Func::Silu,
            &sweep(120.0, 400_000),
            |x| x * sig64(x),
            5.0,
            1e-37,
        );
    }

    #[test]
    fn erf_within_abs_2_5e7() {
        // 2.5e-7 absolute, i.e. a few ulp of the results near 1.
        check(
            Func::Erf,
            &sweep(6.0, 400_000),
            erf64,
            f64::INFINITY,
            2.5e-7,
        );
        // Relative accuracy where |erf| is small (series range).
        check(Func::Erf, &sweep(0.5, 200_000), erf64, 4.0, 0.0);
    }

    fn gelu_erf64(x: f64) -> f64 {
        0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2))
    }

    #[test]
    fn gelu_erf_within_3e6_relative() {
        // The reference: 1 + erf cancels for x < -2, so compute Phi from erfc
        // by its continued fraction there (f64, converged).
        let reference = |x: f64| {
            if x < -2.0 {
                let a = -x / std::f64::consts::SQRT_2;
                let mut f = a;
                for n in (1..=300).rev() {
                    f = a + (n as f64 / 2.0) / f;
                }
                let erfc = (-a * a).exp() / (std::f64::consts::PI.sqrt() * f);
                0.5 * x * erfc
            } else {
                gelu_erf64(x)
            }
        };
        // 50 ulp of f32: 3e-6 to 6e-6 relative.
        check(Func::GeluErf, &sweep(14.0, 400_000), reference, 50.0, 1e-10);
        check(Func::GeluErf, &sweep(3.0, 200_000), reference, 50.0, 1e-10);
    }

    #[test]
    fn gelu_tanh_within_3e6_relative() {
        let reference = |x: f64| {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            // 0.5 (1 + tanh u) = sigmoid(2u), written without cancellation.
            x * sig64(2.0 * c * (x + 0.044715 * x * x * x))
        };
        check(
            Func::GeluTanh,
            &sweep(14.0, 400_000),
            reference,
            50.0,
            1e-10,
        );
    }

    #[test]
    fn piecewise_functions_match_their_definitions_exactly() {
        let xs = sweep(10.0, 20_000);
        let cases: [(Func, fn(f64) -> f64); 5] = [
            (Func::Relu, |x| if x < 0.0 { 0.0 } else { x }),
            (Func::LeakyRelu { alpha: 0.01 }, |x| {
                if x < 0.0 {
                    (0.01f32 * x as f32) as f64
                } else {
                    x
                }
            }),
            (
                Func::Clip {
                    min: -1.5,
                    max: 6.0,
                },
                |x| {
                    if x.is_nan() {
                        x
                    } else {
                        x.clamp(-1.5, 6.0)
                    }
                },
            ),
            (
                Func::HardSigmoid {
                    alpha: 0.2,
                    beta: 0.5,
                },
                |x| {
                    let v = 0.2f32 * x as f32 + 0.5;
                    if v.is_nan() {
                        v as f64
                    } else {
                        v.clamp(0.0, 1.0) as f64
                    }
                },
            ),
            (Func::Identity, |x| x),
        ];
        for (func, reference) in cases {
            check(func, &xs, reference, 0.0, 0.0);
        }
        // HardSwish within 2 ulp of the f64 definition, or 1e-7 absolute
        // near x = -3 where x/6 + 1/2 cancels (the reference kernel computes
        // the same f32 formula).
        check(
            Func::HardSwish,
            &xs,
            |x| x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            2.0,
            1e-7,
        );
        // Relu keeps -0.0 and NaN.
        let mut v = [-0.0f32, f32::NAN];
        apply_inplace(Func::Relu, &mut v);
        assert!(v[0] == 0.0 && v[0].is_sign_negative() && v[1].is_nan());
    }

    #[test]
    fn fused_act_matches_eval() {
        let xs: Vec<f32> = sweep(12.0, 10_000)
            .into_iter()
            // kiln-ir's erf_f64 (used by `eval` for GeluErf) never ends its
            // series loop at x = 0 (its stop test is `add < 1e-17 * sum`
            // with sum = 0), so zero and subnormal inputs are left out here;
            // the per-function tests above cover them.
            .filter(|x| x.is_finite() && x.abs() > 1e-30)
            .collect();
        let acts = [
            FusedAct::Identity,
            FusedAct::Relu,
            FusedAct::Clip { min: 0.0, max: 6.0 },
            FusedAct::Sigmoid,
            FusedAct::Tanh,
            FusedAct::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            FusedAct::HardSwish,
            FusedAct::LeakyRelu { alpha: 0.1 },
            FusedAct::GeluErf,
            FusedAct::GeluTanh,
            FusedAct::Silu,
        ];
        for act in acts {
            let mut got = xs.clone();
            fused_act(act, &mut got);
            for (&x, &g) in xs.iter().zip(&got) {
                let want = act.eval(x);
                let tol = 3e-6 * want.abs() + 1e-7;
                assert!(
                    (g - want).abs() <= tol,
                    "{act:?}({x}) = {g}, eval gives {want}"
                );
            }
        }
    }

    #[test]
    fn map_vec_parallel_matches_serial() {
        let n = PAR_MIN * 3 + 17;
        let xs: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 2000) as f32 / 100.0 - 10.0)
            .collect();
        let par = map_vec(Func::GeluErf, &xs);
        let mut ser = vec![0.0; n];
        map(Func::GeluErf, &xs, &mut ser);
        assert_eq!(par, ser);
        assert!(map_vec(Func::Exp, &[]).is_empty());
    }

    #[test]
    fn row_helpers() {
        for n in [0usize, 1, 7, 15, 16, 17, 33, 100] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            // Values of mixed magnitudes whose sums round, so that another
            // order of additions gives other bits.
            let r: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1000) as f32 * 0.37e-3 * 10f32.powi((i % 9) as i32 - 2))
                .collect();
            let m = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(max_of(&v), m, "n={n}");
            let s: f64 = v.iter().map(|&x| x as f64).sum();
            assert!((sum_of(&v) as f64 - s).abs() < 1e-4, "n={n}");
            let mut w = v.clone();
            if n > 3 {
                w[3] = f32::NAN;
                assert!(max_of(&w).is_nan());
            }
            // The portable loops and the dispatched ones (AVX-512
            // intrinsics here when the CPU has them) agree: the same
            // maximum (up to the sign of a zero), the same partial sums
            // added in the same order.
            assert_eq!(max_generic(&r), max_of(&r), "n={n}");
            assert_eq!(sum_generic(&r).to_bits(), sum_of(&r).to_bits(), "n={n}");
            if n > 0 {
                // NaN in the last place (the remainder, or the last full
                // chunk), and infinities, which are not NaN.
                let mut w = v.clone();
                w[n - 1] = f32::NAN;
                assert!(max_of(&w).is_nan() && max_generic(&w).is_nan(), "n={n}");
                w[n - 1] = f32::INFINITY;
                assert_eq!(max_of(&w), f32::INFINITY, "n={n}");
                w[0] = f32::NEG_INFINITY;
                assert!(!max_of(&w).is_nan(), "n={n}");
                let all_low = vec![f32::NEG_INFINITY; n];
                assert_eq!(max_of(&all_low), f32::NEG_INFINITY, "n={n}");
            }
            let mut e = v.clone();
            let total = exp_shift_sum(&mut e, 1.0);
            let want: f64 = v.iter().map(|&x| (x as f64 - 1.0).exp()).sum();
            assert!((total as f64 - want).abs() <= 1e-5 * want.max(1.0), "n={n}");
        }
    }

    /// Prints ns per element for each function at the CPU's level, against the
    /// plain `std` loop. `cargo test --release -p kiln-cpu fastmath_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn fastmath_speed() {
        let n = 128 * 3072;
        let xs: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 2000) as f32 / 200.0 - 5.0)
            .collect();
        let mut out = vec![0.0; n];
        let time = |f: &mut dyn FnMut()| {
            let mut best = f64::INFINITY;
            for _ in 0..20 {
                let t = std::time::Instant::now();
                f();
                best = best.min(t.elapsed().as_secs_f64());
            }
            best * 1e9 / n as f64
        };
        for func in [
            Func::Relu,
            Func::Exp,
            Func::Tanh,
            Func::Sigmoid,
            Func::Erf,
            Func::Silu,
            Func::GeluErf,
            Func::GeluTanh,
            Func::HardSwish,
        ] {
            let fast = time(&mut || map(func, &xs, &mut out));
            let port = time(&mut || map_at(Level::Portable, func, &xs, &mut out));
            eprintln!(
                "{func:?}: {fast:.3} ns/elem ({:?}), portable {port:.3}",
                level()
            );
        }
        let std_exp = time(&mut || {
            for (o, &x) in out.iter_mut().zip(&xs) {
                *o = x.exp();
            }
        });
        let std_tanh = time(&mut || {
            for (o, &x) in out.iter_mut().zip(&xs) {
                *o = x.tanh();
            }
        });
        eprintln!("std exp {std_exp:.3} ns/elem, std tanh {std_tanh:.3}");
    }
}
