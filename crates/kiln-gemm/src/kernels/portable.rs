//! The portable microkernel in plain Rust: fixed-size accumulator arrays the
//! compiler keeps in vector registers. It serves CPUs without AVX2 and aarch64
//! (where `mul_add` is a NEON `fmla`; there is no hand-written NEON kernel yet).
//! Also the body of the GEMV helpers, instantiated with and without FMA.

/// Tile sizes: on aarch64, 32 128-bit registers hold an 8 x 12 tile (24
/// accumulators); on baseline x86-64 (16 SSE registers) 4 x 8 (8 accumulators).
#[cfg(target_arch = "aarch64")]
pub(crate) const MR: usize = 8;
#[cfg(target_arch = "aarch64")]
pub(crate) const NR: usize = 12;
#[cfg(not(target_arch = "aarch64"))]
pub(crate) const MR: usize = 4;
#[cfg(not(target_arch = "aarch64"))]
pub(crate) const NR: usize = 8;

/// Multiply-add, fused where the target has a fused instruction inline (without
/// one, `f32::mul_add` is a slow libm call, so plain `a * b + c` is used).
pub(crate) trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// `a.mul_add(b, c)`: for targets/functions with hardware FMA.
pub(crate) struct Fused;
/// `a * b + c`.
pub(crate) struct Unfused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) type Native = Fused;
#[cfg(not(target_arch = "aarch64"))]
pub(crate) type Native = Unfused;

/// `C[..mr, ..nr] = alpha * A·B + beta * C` for one tile (`beta == 0`: C not read).
///
/// # Safety
/// `a` must point to `kc * MR` readable floats, `b` to `kc` rows of `NR`
/// readable floats, `ldb` apart, and `c` to an `mr x nr` tile with row stride
/// `ldc`, `1 <= mr <= MR`, `1 <= nr <= NR`.
pub(crate) unsafe fn micro(
    kc: usize,
    a: super::TileA,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
    mr: usize,
    nr: usize,
    fin: Option<&super::TileFinish>,
) {
    debug_assert!((1..=MR).contains(&mr) && (1..=NR).contains(&nr));
    // Packed A only (`Kernel::reads_a_in_place` is false).
    let super::TileA::Packed(a) = a else {
        unreachable!("the portable kernel reads packed A only")
    };
    // SAFETY: the contract gives kc*MR floats at `a`.
    let a = unsafe { std::slice::from_raw_parts(a, kc * MR) };
    let mut acc = [[0f32; NR]; MR];
    for (p, ap) in a.chunks_exact(MR).enumerate() {
        // SAFETY: the contract gives kc rows of NR floats at `b`, ldb apart.
        let bp: &[f32; NR] = unsafe { &*(b.add(p * ldb) as *const [f32; NR]) };
        for r in 0..MR {
            let av = ap[r];
            for j in 0..NR {
                acc[r][j] = Native::mul_add(av, bp[j], acc[r][j]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(mr) {
        // SAFETY: row r < mr and columns < nr lie inside the caller's C tile.
        let crow = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), nr) };
        for (j, (y, &x)) in crow.iter_mut().zip(row).enumerate() {
            let v = if beta == 0.0 {
                alpha * x
            } else {
                alpha * x + beta * *y
            };
            *y = match fin {
                // SAFETY: (r, j) is inside the tile, which `fin` covers (contract).
                Some(f) => unsafe { f.scalar(r, j, v) },
                None => v,
            };
        }
    }
}

/// `y += alpha * x` (over the shorter length), in independent 16-wide chunks.
#[inline(always)]
pub(crate) fn axpy_body<F: MulAdd>(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &mut y[..n]);
    let mut xc = x.chunks_exact(16);
    let mut yc = y.chunks_exact_mut(16);
    for (xs, ys) in (&mut xc).zip(&mut yc) {
        for (v, &u) in ys.iter_mut().zip(xs) {
            *v = F::mul_add(alpha, u, *v);
        }
    }
    for (v, &u) in yc.into_remainder().iter_mut().zip(xc.remainder()) {
        *v = F::mul_add(alpha, u, *v);
    }
}

/// `sum x[p] * y[p]` with 32 independent partial sums (so it vectorizes).
#[inline(always)]
pub(crate) fn dot_body<F: MulAdd>(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [0f32; 32];
    let mut xc = x.chunks_exact(32);
    let mut yc = y.chunks_exact(32);
    for (xs, ys) in (&mut xc).zip(&mut yc) {
        for i in 0..32 {
            acc[i] = F::mul_add(xs[i], ys[i], acc[i]);
        }
    }
    let mut tail = 0f32;
    for (&u, &v) in xc.remainder().iter().zip(yc.remainder()) {
        tail = F::mul_add(u, v, tail);
    }
    // Pairwise reduction of the partial sums.
    let mut w = 16;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0] + tail
}

/// `out[j] = sum_p x[p] * panel[p * NR + j]` for one packed B panel (`NR`
/// columns, `x.len()` rows): the m == 1 product over prepacked weights. Two
/// accumulator rows (even and odd p) stay in registers, so the loop is bound by
/// streaming the panel, not by a store-to-load chain through `out`.
#[inline(always)]
pub(crate) fn panel_gemv_body<F: MulAdd, const N: usize>(
    x: &[f32],
    panel: &[f32],
    out: &mut [f32],
) {
    let k = x.len();
    let panel = &panel[..k * N];
    let mut even = [0f32; N];
    let mut odd = [0f32; N];
    let mut pairs = panel.chunks_exact(2 * N);
    let mut xs = x.chunks_exact(2);
    for (rows, xp) in (&mut pairs).zip(&mut xs) {
        let (r0, r1) = rows.split_at(N);
        for j in 0..N {
            even[j] = F::mul_add(xp[0], r0[j], even[j]);
            odd[j] = F::mul_add(xp[1], r1[j], odd[j]);
        }
    }
    if let (Some(&xl), true) = (xs.remainder().first(), pairs.remainder().len() == N) {
        let r = pairs.remainder();
        for j in 0..N {
            even[j] = F::mul_add(xl, r[j], even[j]);
        }
    }
    for (o, (e, d)) in out.iter_mut().zip(even.iter().zip(&odd)) {
        *o = e + d;
    }
}

pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    axpy_body::<Native>(alpha, x, y)
}

pub(crate) fn panel_gemv(x: &[f32], panel: &[f32], out: &mut [f32]) {
    panel_gemv_body::<Native, NR>(x, panel, out)
}

pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 {
    dot_body::<Native>(x, y)
}
