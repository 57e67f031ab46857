//! Neural-network kernels: convolution, pooling, normalization, GEMM/MatMul and
//! softmax.
//!
//! Float kernels are generic over [`Real`] (f32 and f64). f16 and bf16 tensors are
//! computed in f32 and converted back. The GEMM core ([`gemm_acc`]) is also used
//! by integer MatMul, Conv (im2col), ConvTranspose, f64 LSTM and Resize.

mod conv;
// AVX-512 only: a tuning candidate where it runs.
#[cfg(target_arch = "x86_64")]
mod conv_lanes;
mod conv_phases;
mod depthwise;
// AVX-512 only: elsewhere depthwise convs take the per-plane kernels.
#[cfg(target_arch = "x86_64")]
mod depthwise_rows;
#[cfg(target_arch = "x86_64")]
mod depthwise_tiled;
mod matmul;
mod norm;
mod pool;
// AVX-512 only (it runs on the depthwise row kernel).
#[cfg(target_arch = "x86_64")]
mod pw_dw;
mod sdpa;
// AVX-512 only: elsewhere 3x3 convs take the direct or GEMM paths.
#[cfg(target_arch = "x86_64")]
mod winograd;

pub(crate) use conv::{clamp_of, is_pointwise, prefers_positions};
pub use conv::{conv, conv_transpose};
pub(crate) use conv::{
    conv_f32, conv_geometry, conv_nhwc_gathered, direct_possible, gathered_applies,
    gathered_possible, pack_conv_weights, pack_conv_weights_gathered, uses_direct_kernel, ConvPack,
    ConvWeights,
};
#[cfg(target_arch = "x86_64")]
pub(crate) use conv_lanes::{possible as lanes_possible, LanesWeights};
#[cfg(test)]
pub(crate) use depthwise::conv_nhwc_with as depthwise_conv_nhwc_with;
#[cfg(target_arch = "x86_64")]
pub(crate) use depthwise::MAX_NHWC_TAPS;
pub(crate) use depthwise::{conv_nhwc as depthwise_conv_nhwc, many_channel_applies};
pub(crate) use depthwise_tiled::lane_weights as depthwise_lane_weights;
#[cfg(target_arch = "x86_64")]
pub(crate) use depthwise_tiled::transpose16;
pub(crate) use matmul::{
    f32_slice, gemm_acc, gemm_f32, matmul_f32, matmul_f32_fused, matmul_shape, MatmulB,
};
pub use matmul::{gemm, matmul};
pub use norm::{batch_norm, instance_norm, layer_norm, softmax};
pub use pool::{avg_pool, global_pool, max_pool};
#[cfg(target_arch = "x86_64")]
pub(crate) use pw_dw::{one_kernel as pointwise_depthwise_one_kernel, pointwise_depthwise_f32};
pub(crate) use sdpa::attention_f32;
#[cfg(target_arch = "x86_64")]
pub(crate) use winograd::{applies as winograd_applies, WinogradWeights};

use crate::{invalid, unsupported, Result};
use half::{bf16, f16};
use kiln_ir::{DType, Tensor, TensorData};
use std::borrow::Cow;
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// Starts reading every cache line of `out` before a kernel stores into it.
/// The activation buffers kernels write are usually out of cache (last
/// written a whole run ago), and a store to such a line waits for the line
/// to be read first; issued ahead of the work that computes the values,
/// those reads overlap it. A no-op off x86_64.
#[inline]
pub(crate) fn prefetch_for_store(out: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for i in (0..out.len()).step_by(16) {
        // SAFETY: SSE is baseline on x86_64; the address lies inside `out`,
        // and a prefetch never faults or changes memory.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(out.as_ptr().add(i) as *const i8)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = out;
}

/// An element type the GEMM core can multiply-accumulate. Floats use plain
/// `acc + a * b`; integers wrap on overflow (exact modular arithmetic, like numpy).
pub(crate) trait MatElem: Copy + Send + Sync + 'static {
    const ZERO: Self;
    fn madd(acc: Self, a: Self, b: Self) -> Self;
}

macro_rules! float_mat_elem {
    ($($t:ty),*) => {$(
        impl MatElem for $t {
            const ZERO: Self = 0.0;
            #[inline(always)]
            fn madd(acc: Self, a: Self, b: Self) -> Self {
                acc + a * b
            }
        }
    )*};
}
float_mat_elem!(f32, f64);

macro_rules! int_mat_elem {
    ($($t:ty),*) => {$(
        impl MatElem for $t {
            const ZERO: Self = 0;
            #[inline(always)]
            fn madd(acc: Self, a: Self, b: Self) -> Self {
                acc.wrapping_add(a.wrapping_mul(b))
            }
        }
    )*};
}
int_mat_elem!(i32, i64, u32, u64);

/// A float type the reference kernels compute in (f32 or f64).
pub(crate) trait Real:
    MatElem
    + PartialOrd
    + Debug
    + Default
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    /// The tensor's elements as `Self` when that needs no conversion (or only the
    /// f16/bf16 -> f32 widening); `None` for other dtypes.
    fn view(data: &TensorData) -> Option<Cow<'_, [Self]>>;
    /// Wraps a result computed in `Self` as a buffer of `dtype` (narrowing f32
    /// back to f16/bf16 when the inputs were half precision).
    fn into_data(v: Vec<Self>, dtype: DType) -> TensorData;
    /// `c = a * b` (`a` `m x k`, `b` `k x n`, both row-major): the blocked
    /// reference core ([`matmul::gemm_acc`]) on a zeroed `c`; f32 runs the
    /// threaded, vectorized `kiln_gemm::sgemm` instead, tested against it.
    fn product(m: usize, k: usize, n: usize, a: &[Self], b: &[Self], c: &mut [Self]) {
        c.fill(Self::ZERO);
        matmul::gemm_acc(m, k, n, a, b, c);
    }
    /// A matrix `b` (`n x k` row-major, as RNN weights are stored) made
    /// ready, once, for products by its transpose ([`Real::product_bt`]).
    type Bt;
    /// `b` transposed (the reference core's operand); f32 packs `b^T` for
    /// `kiln_gemm` instead.
    fn prepare_bt(b: &[Self], n: usize, k: usize) -> Self::Bt;
    /// `c = a * b^T`, or `c += a * b^T` with `acc` (`a` `m x k` row-major,
    /// `bt` from [`Real::prepare_bt`] of an `n x k` matrix): the reference
    /// core; f32 runs `kiln_gemm::sgemm`, tested against it.
    #[allow(clippy::too_many_arguments)]
    fn product_bt(
        m: usize,
        k: usize,
        n: usize,
        a: &[Self],
        bt: &Self::Bt,
        c: &mut [Self],
        acc: bool,
    );
}

/// [`Real::product_bt`] on the reference core, `bt` already transposed.
fn reference_product_bt<T: MatElem>(
    m: usize,
    k: usize,
    n: usize,
    a: &[T],
    bt: &[T],
    c: &mut [T],
    acc: bool,
) {
    let c = &mut c[..m * n];
    if !acc {
        c.fill(T::ZERO);
    }
    matmul::gemm_acc(m, k, n, a, bt, c);
}

impl Real for f32 {
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    fn view(data: &TensorData) -> Option<Cow<'_, [Self]>> {
        match data {
            TensorData::F32(v) => Some(Cow::Borrowed(v.as_slice())),
            TensorData::F16(v) => Some(Cow::Owned(v.iter().map(|x| x.to_f32()).collect())),
            TensorData::BF16(v) => Some(Cow::Owned(v.iter().map(|x| x.to_f32()).collect())),
            _ => None,
        }
    }
    fn into_data(v: Vec<Self>, dtype: DType) -> TensorData {
        match dtype {
            DType::F16 => TensorData::F16(v.into_iter().map(f16::from_f32).collect()),
            DType::BF16 => TensorData::BF16(v.into_iter().map(bf16::from_f32).collect()),
            _ => TensorData::F32(v),
        }
    }
    fn product(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
        use kiln_gemm::{sgemm, Lhs, MatRef, Rhs};
        let (a, b) = (
            MatRef::row_major(&a[..m * k], m, k),
            MatRef::row_major(&b[..k * n], k, n),
        );
        sgemm(1.0, Lhs::Mat(a), Rhs::Mat(b), 0.0, &mut c[..m * n], n, None);
    }
    type Bt = kiln_gemm::PackedB;
    fn prepare_bt(b: &[f32], n: usize, k: usize) -> kiln_gemm::PackedB {
        kiln_gemm::PackedB::new(kiln_gemm::MatRef::row_major(&b[..n * k], n, k).t())
    }
    fn product_bt(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        bt: &kiln_gemm::PackedB,
        c: &mut [f32],
        acc: bool,
    ) {
        use kiln_gemm::{sgemm, Lhs, MatRef, Rhs};
        let c = &mut c[..m * n];
        if m == 0 || n == 0 || k == 0 {
            if !acc {
                c.fill(0.0);
            }
            return;
        }
        let a = MatRef::row_major(&a[..m * k], m, k);
        let beta = if acc { 1.0 } else { 0.0 };
        sgemm(1.0, Lhs::Mat(a), Rhs::Packed(bt), beta, c, n, None);
    }
}

impl Real for f64 {
    type Bt = Vec<f64>;
    fn prepare_bt(b: &[f64], n: usize, k: usize) -> Vec<f64> {
        matmul::transpose(&b[..n * k], n, k)
    }
    fn product_bt(
        m: usize,
        k: usize,
        n: usize,
        a: &[f64],
        bt: &Vec<f64>,
        c: &mut [f64],
        acc: bool,
    ) {
        reference_product_bt(m, k, n, a, bt, c, acc)
    }
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn view(data: &TensorData) -> Option<Cow<'_, [Self]>> {
        match data {
            TensorData::F64(v) => Some(Cow::Borrowed(v.as_slice())),
            _ => None,
        }
    }
    fn into_data(v: Vec<Self>, _dtype: DType) -> TensorData {
        TensorData::F64(v)
    }
}

/// The precision a float kernel runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prec {
    F32,
    F64,
}

/// Picks the compute precision for a float input of `op`, or an `Unsupported`
/// error naming the dtype.
pub(crate) fn float_prec(t: &Tensor, op: &str) -> Result<Prec> {
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(Prec::F32),
        DType::F64 => Ok(Prec::F64),
        d => Err(unsupported!("{op} on {d} tensors")),
    }
}

/// The elements of a float tensor as `T`: borrowed when the dtype already is
/// `T`, converted otherwise (any float dtype is accepted, so e.g. f32 scale
/// parameters work with f64 data).
pub(crate) fn values<'a, T: Real>(t: &'a Tensor, what: &str) -> Result<Cow<'a, [T]>> {
    if let Some(v) = T::view(t.data()) {
        return Ok(v);
    }
    if !t.dtype().is_float() {
        return Err(invalid!(
            "{what}: expected a float tensor, got {} {:?}",
            t.dtype(),
            t.shape()
        ));
    }
    let v = t.to_f64_vec().map_err(|e| invalid!("{what}: {e}"))?;
    Ok(Cow::Owned(v.into_iter().map(T::from_f64).collect()))
}

/// Builds the output tensor of a float kernel computed in `T`, in the dtype of
/// the original input.
pub(crate) fn float_tensor<T: Real>(shape: Vec<usize>, v: Vec<T>, dtype: DType) -> Result<Tensor> {
    crate::util::tensor(shape, T::into_data(v, dtype))
}

/// A raw pointer to an output buffer that parallel tasks share, each
/// writing its own disjoint part (every user says which at its `unsafe`
/// write), while the buffer stays borrowed for the whole parallel loop.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: see the type's contract: writes through it are disjoint per task
// and the buffer outlives the parallel section.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper,
    /// not the field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Product of dims, or an error when it overflows.
pub(crate) fn numel(shape: &[usize]) -> Result<usize> {
    kiln_ir::checked_numel(shape).ok_or_else(|| invalid!("shape {shape:?} is too large"))
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::{conv_f32, ConvWeights};
    use kiln_ir::{ConvAttrs, FusedAct, Tensor};

    /// A small deterministic pseudo-random generator (xorshift) for tests.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        /// Uniform in [-1, 1).
        pub fn f32(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
        pub fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f32()).collect()
        }
    }

    pub fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    pub fn f32s(t: &Tensor) -> Vec<f32> {
        t.as_slice::<f32>().unwrap().to_vec()
    }

    /// Every permutation of `0..n`.
    pub fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in permutations(n - 1) {
            for pos in 0..=p.len() {
                let mut q = p.clone();
                q.insert(pos, n - 1);
                out.push(q);
            }
        }
        out
    }

    /// A fused activation and its scalar definition.
    pub type ActCase = (FusedAct, fn(f32) -> f32);

    /// The activations the fast conv kernels fuse.
    pub fn epilogue_acts() -> [ActCase; 4] {
        [
            (FusedAct::Identity, |v| v),
            (FusedAct::Relu, |v| v.max(0.0)),
            (
                FusedAct::Clip {
                    min: -0.25,
                    max: 0.5,
                },
                |v| v.clamp(-0.25, 0.5),
            ),
            (FusedAct::Sigmoid, |v| 1.0 / (1.0 + (-v).exp())),
        ]
    }

    /// Runs the fast conv under every fused epilogue (each of
    /// [`epilogue_acts`], with and without `res` as the residual) and hands
    /// each output with its expected values to `check(act, with_res, got,
    /// want)`; `plain` is the reference conv with its bias, before any
    /// activation.
    #[allow(clippy::too_many_arguments)]
    pub fn check_epilogues(
        a: &ConvAttrs,
        x: &Tensor,
        w_shape: &[usize],
        weights: ConvWeights<'_>,
        bias: &Tensor,
        plain: &[f32],
        res: &Tensor,
        mut check: impl FnMut(FusedAct, bool, &[f32], &[f32]),
    ) {
        let resv = f32s(res);
        for (act, f) in epilogue_acts() {
            for with_res in [false, true] {
                let r = with_res.then_some(res);
                let got = conv_f32(a, x, w_shape, weights, Some(bias), r, act).unwrap();
                let want: Vec<f32> = plain
                    .iter()
                    .zip(&resv)
                    .map(|(&v, &rv)| f(if with_res { v + rv } else { v }))
                    .collect();
                check(act, with_res, &f32s(&got), &want);
            }
        }
    }

    /// The reference conv (`conv_reference`) of f32 tensors computed in
    /// f64, rounded to f32: the values the fast kernels are held to.
    pub fn conv_reference_f64(a: &ConvAttrs, x: &Tensor, w: &Tensor, b: &Tensor) -> Vec<f32> {
        let f64_tensor = |t: &Tensor| {
            let v: Vec<f64> = f32s(t).iter().map(|&v| v as f64).collect();
            Tensor::from_vec(t.shape().to_vec(), v).unwrap()
        };
        let exact =
            super::conv::conv_reference(a, &f64_tensor(x), &f64_tensor(w), Some(&f64_tensor(b)))
                .unwrap();
        exact
            .as_slice::<f64>()
            .unwrap()
            .iter()
            .map(|&v| v as f32)
            .collect()
    }

    /// Each `got[i]` within `tol * (1 + |want[i]|)` of `want[i]`; a failure
    /// names `what` and the element (not the whole arrays, which for a
    /// conv's output are thousands of values).
    #[track_caller]
    pub fn assert_close_in(what: impl std::fmt::Display, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}: element {i} got {g}, want {w}"
            );
        }
    }

    #[track_caller]
    pub fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let ok = (g - w).abs() <= tol * (1.0 + w.abs()) || (g.is_nan() && w.is_nan());
            assert!(
                ok,
                "element {i}: got {g}, want {w}\n got {got:?}\nwant {want:?}"
            );
        }
    }
}
