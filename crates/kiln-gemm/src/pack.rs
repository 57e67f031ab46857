//! Packing: A into `MR`-row micro-panels and B into `NR`-column micro-panels,
//! each spanning the whole `k` and stored k-major, so that the panel slice for
//! any k-block `[pc, pc + kc)` is contiguous (`panel + pc * MR` for A, `panel +
//! pc * NR` for B). Rows/columns past the matrix edge are zero.
//!
//! The same layout serves operands packed once at plan time ([`crate::PackedA`],
//! [`crate::PackedB`]) and operands packed per call, so the compute loop never
//! needs to know which it got.

use crate::MatRef;
use rayon::prelude::*;

/// One 64-byte-aligned group of 16 floats: the unit of [`AlignedBuf`], so every
/// packed B row of a panel (16, 32 or 64 floats) starts on a cache line.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(crate) struct Line([f32; 16]);

/// A 64-byte-aligned, zero-initialised f32 buffer.
#[derive(Clone, Debug, Default)]
pub(crate) struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn zeroed(len: usize) -> AlignedBuf {
        let mut b = AlignedBuf::default();
        b.reset(len);
        b
    }

    /// Resizes to `len` floats, keeping the allocation when it is big enough.
    /// Contents are unspecified afterwards (packing overwrites every element).
    pub(crate) fn reset(&mut self, len: usize) {
        let n = len.div_ceil(16);
        if self.lines.len() < n {
            self.lines.resize(n, Line([0.0; 16]));
        }
        self.len = len;
    }

    pub(crate) fn capacity_floats(&self) -> usize {
        self.lines.capacity() * 16
    }

    pub(crate) fn as_slice(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` around `[f32; 16]` (size 64, no padding), so
        // `lines` is `lines.len() * 16` initialised, contiguous f32s, and
        // `len <= lines.len() * 16` by `reset`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const f32, self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`; the unique borrow of `self` makes it exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut f32, self.len) }
    }
}

/// Below this many floats, packing runs on the calling thread.
const PAR_PACK_MIN: usize = 1 << 16;

/// Runs `work(first, panel)` on each `width * k`-float micro-panel of `dst`
/// (`ceil(outer / width)` of them; `first` = the panel's first row of A or
/// column of B), in parallel when `dst` is big. `what` names the caller in
/// the size check.
fn each_panel(
    what: &str,
    outer: usize,
    width: usize,
    k: usize,
    dst: &mut [f32],
    work: impl Fn(usize, &mut [f32]) + Sync,
) {
    let panel = width * k;
    assert_eq!(
        dst.len(),
        outer.div_ceil(width) * panel,
        "{what}: wrong buffer size"
    );
    if panel == 0 {
        return;
    }
    let work = |(i, d): (usize, &mut [f32])| work(i * width, d);
    if dst.len() >= PAR_PACK_MIN && rayon::current_num_threads() > 1 {
        dst.par_chunks_mut(panel).enumerate().for_each(work);
    } else {
        dst.chunks_mut(panel).enumerate().for_each(work);
    }
}

/// Packs all of `a` (`m x k`) into `dst` (`ceil(m/mr) * mr * k` floats).
pub(crate) fn pack_a(a: MatRef<'_>, mr: usize, dst: &mut [f32]) {
    each_panel("pack_a", a.rows(), mr, a.cols(), dst, |i0, d| {
        pack_a_panel(a, i0, mr, d)
    });
}

/// Packs all of `b` (`k x n`) into `dst` (`ceil(n/nr) * nr * k` floats).
pub(crate) fn pack_b(b: MatRef<'_>, nr: usize, dst: &mut [f32]) {
    each_panel("pack_b", b.cols(), nr, b.rows(), dst, |j0, d| {
        pack_b_panel(b, j0, nr, d)
    });
}

/// Fills every `width`-wide micro-panel of a caller-packed operand into `dst`
/// (`ceil(outer / width)` panels of `width * k` floats; `outer` is A's rows or
/// B's columns), in parallel when it is big.
pub(crate) fn fill_panels(
    fill: &crate::PanelFill<'_>,
    outer: usize,
    k: usize,
    width: usize,
    dst: &mut [f32],
) {
    each_panel("fill_panels", outer, width, k, dst, |first, d| {
        fill(first, width, d)
    });
}

/// A caller-packed operand as a row-major matrix (for the reference): `as_b`
/// says whether it is packed as B (column panels) or as A (row panels).
pub(crate) fn unpack_panels(p: &crate::Panels<'_>, as_b: bool) -> Vec<f32> {
    let (rows, cols) = (p.rows, p.cols);
    let mut dense = vec![0.0f32; rows * cols];
    // One-wide panels: every element lands at a fixed place.
    let (outer, k) = if as_b { (cols, rows) } else { (rows, cols) };
    let mut panel = vec![0.0f32; k];
    for o in 0..outer {
        (p.fill)(o, 1, &mut panel);
        for (q, &v) in panel.iter().enumerate() {
            if as_b {
                dense[q * cols + o] = v;
            } else {
                dense[o * cols + q] = v;
            }
        }
    }
    dense
}

/// Rows `i0 .. i0 + mr` of `a` (zero past the last row): `dst[p * mr + r] = a[i0 + r, p]`.
fn pack_a_panel(a: MatRef<'_>, i0: usize, mr: usize, dst: &mut [f32]) {
    let k = a.cols();
    let rows = mr.min(a.rows() - i0);
    let (rs, cs, data) = (a.row_stride(), a.col_stride(), a.data());
    if rows < mr {
        dst.fill(0.0);
    }
    if cs == 1 && rows == mr && mr == 6 {
        // Full panel of the AVX2/AVX-512 tile height: gather the six rows
        // per k step into one contiguous run (no bounds checks in the loop).
        pack_a_full::<6>(data, rs, i0, k, dst);
    } else if cs == 1 {
        // Row-major rows: read each row contiguously, scatter with stride mr.
        for r in 0..rows {
            let src = &data[(i0 + r) * rs..(i0 + r) * rs + k];
            for (p, &v) in src.iter().enumerate() {
                dst[p * mr + r] = v;
            }
        }
    } else if rs == 1 {
        // Column-major (a transposed view): each k step is a contiguous run of rows.
        for p in 0..k {
            let src = &data[p * cs + i0..p * cs + i0 + rows];
            dst[p * mr..p * mr + rows].copy_from_slice(src);
        }
    } else {
        for p in 0..k {
            for r in 0..rows {
                dst[p * mr + r] = data[(i0 + r) * rs + p * cs];
            }
        }
    }
}

/// A full `MR`-row panel of a row-major A (row stride `rs`):
/// `dst[p * MR + r] = a[i0 + r, p]`.
fn pack_a_full<const MR: usize>(data: &[f32], rs: usize, i0: usize, k: usize, dst: &mut [f32]) {
    let rows: [&[f32]; MR] = std::array::from_fn(|r| &data[(i0 + r) * rs..][..k]);
    for (p, d) in dst[..k * MR].chunks_exact_mut(MR).enumerate() {
        let d: &mut [f32; MR] = d.try_into().expect("chunk of MR");
        for r in 0..MR {
            d[r] = rows[r][p];
        }
    }
}

/// Columns `j0 .. j0 + nr` of `b` (zero past the last column): `dst[p * nr + c] = b[p, j0 + c]`.
/// Rows `0..k` of `data` (`rs` apart), `W` floats each from column `j0`,
/// into `dst` back to back.
fn copy_rows<const W: usize>(data: &[f32], rs: usize, j0: usize, k: usize, dst: &mut [f32]) {
    for (p, d) in dst.chunks_exact_mut(W).take(k).enumerate() {
        let src: &[f32; W] = data[p * rs + j0..][..W]
            .try_into()
            .expect("a slice of W floats");
        let d: &mut [f32; W] = d.try_into().expect("a chunk of W floats");
        *d = *src;
    }
}

pub(crate) fn pack_b_panel(b: MatRef<'_>, j0: usize, nr: usize, dst: &mut [f32]) {
    let k = b.rows();
    let cols = nr.min(b.cols() - j0);
    let (rs, cs, data) = (b.row_stride(), b.col_stride(), b.data());
    if cols < nr {
        dst.fill(0.0);
    }
    if cs == 1 {
        // Whole rows of the AVX-512 and AVX2 kernels' widths as fixed-size
        // copies, which compile to a few vector moves: a memmove call per
        // 256-byte row cost as much as the move.
        match (cols, nr) {
            (64, 64) => copy_rows::<64>(data, rs, j0, k, dst),
            (16, 16) => copy_rows::<16>(data, rs, j0, k, dst),
            _ => {
                for p in 0..k {
                    let src = &data[p * rs + j0..p * rs + j0 + cols];
                    dst[p * nr..p * nr + cols].copy_from_slice(src);
                }
            }
        }
    } else if rs == 1 {
        pack_b_transposed(data, cs, j0, cols, k, nr, dst);
    } else {
        for p in 0..k {
            for c in 0..cols {
                dst[p * nr + c] = data[p * rs + (j0 + c) * cs];
            }
        }
    }
}

/// Columns `j0 .. j0 + cols` of a transposed view (column c's `k` values
/// contiguous from `data[c * cs]`, c from `j0`) into an `nr`-wide panel. In 16 x 16
/// blocks: each reads 16 runs of 16 floats and writes 16 rows of 16, where
/// a column at a time wrote every float to its own line (attention's
/// `Q · K^T`, whose K^T is such a view: a tenth of the head's time).
fn pack_b_transposed(
    data: &[f32],
    cs: usize,
    j0: usize,
    cols: usize,
    k: usize,
    nr: usize,
    dst: &mut [f32],
) {
    const T: usize = 16;
    let (full_c, full_p) = (cols - cols % T, k - k % T);
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    for c0 in (0..full_c).step_by(T) {
        let srcs: [&[f32]; T] = std::array::from_fn(|c| &data[(j0 + c0 + c) * cs..][..k]);
        for p0 in (0..full_p).step_by(T) {
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                let rows: [&[f32; T]; T] = std::array::from_fn(|c| {
                    srcs[c][p0..p0 + T].try_into().expect("a run of T floats")
                });
                // Rows p0.. of the panel: T rows of nr floats, the first T
                // of each written from column c0 on.
                let out = &mut dst[p0 * nr + c0..(p0 + T - 1) * nr + c0 + T];
                // SAFETY: the CPU has AVX-512F (checked above); `rows` are 16
                // runs of 16 floats, and `out` holds 16 rows of 16 floats
                // `nr` apart (its length is exactly that).
                unsafe { transpose16_avx512(rows, out, nr) };
                continue;
            }
            let blk: [[f32; T]; T] =
                std::array::from_fn(|c| srcs[c][p0..p0 + T].try_into().expect("a run of T floats"));
            for p in 0..T {
                let row: &mut [f32; T] = (&mut dst[(p0 + p) * nr + c0..][..T])
                    .try_into()
                    .expect("a row of T floats");
                *row = std::array::from_fn(|c| blk[c][p]);
            }
        }
        for p in full_p..k {
            for c in 0..T {
                dst[p * nr + c0 + c] = srcs[c][p];
            }
        }
    }
    for c in full_c..cols {
        let src = &data[(j0 + c) * cs..][..k];
        for (p, &v) in src.iter().enumerate() {
            dst[p * nr + c] = v;
        }
    }
}

/// `out[j * ld + i] = rows[i][j]` for a 16 x 16 block, in registers
/// ([`transpose16`]).
///
/// Panics unless `out` holds `15 * ld + 16` floats and `ld >= 16`.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16_avx512(rows: [&[f32; 16]; 16], out: &mut [f32], ld: usize) {
    use std::arch::x86_64::*;
    assert!(ld >= 16 && out.len() >= 15 * ld + 16);
    // SAFETY: each row is 16 readable floats, and `out` holds row j's 16
    // floats at j * ld (asserted); AVX-512F is the caller's contract.
    unsafe {
        let mut v: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(rows[i].as_ptr()));
        transpose16(&mut v);
        for (j, row) in v.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(j * ld), *row);
        }
    }
}

/// In-register transpose of a 16x16 block: afterwards `v[j]` lane `i` is the
/// old `v[i]` lane `j`. (Used by the packing of transposed B panels here and
/// by kiln-cpu's channels-last tiles.)
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn transpose16(v: &mut [std::arch::x86_64::__m512; 16]) {
    use std::arch::x86_64::*;
    // Interleave row pairs: t[2i] = (a0 b0 a1 b1 | a4 b4 a5 b5 | ...),
    // t[2i + 1] = (a2 b2 a3 b3 | ...) for rows a = 2i, b = 2i + 1.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..16 / 2 {
        t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    // Groups of four rows: q[4g + k] holds, in 128-bit lane L, column
    // 4L + k of rows 4g..4g + 4.
    let mut q = [_mm512_setzero_ps(); 16];
    for gi in 0..4 {
        let (a, b, c, d) = (t[4 * gi], t[4 * gi + 1], t[4 * gi + 2], t[4 * gi + 3]);
        q[4 * gi] = _mm512_shuffle_ps::<0x44>(a, c);
        q[4 * gi + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
        q[4 * gi + 2] = _mm512_shuffle_ps::<0x44>(b, d);
        q[4 * gi + 3] = _mm512_shuffle_ps::<0xEE>(b, d);
    }
    // Column 4L + k: lane L of q[k], q[4 + k], q[8 + k], q[12 + k].
    for k in 0..4 {
        let (g0, g1, g2, g3) = (q[k], q[4 + k], q[8 + k], q[12 + k]);
        let even01 = _mm512_shuffle_f32x4::<0x88>(g0, g1);
        let odd01 = _mm512_shuffle_f32x4::<0xDD>(g0, g1);
        let even23 = _mm512_shuffle_f32x4::<0x88>(g2, g3);
        let odd23 = _mm512_shuffle_f32x4::<0xDD>(g2, g3);
        v[k] = _mm512_shuffle_f32x4::<0x88>(even01, even23);
        v[8 + k] = _mm512_shuffle_f32x4::<0xDD>(even01, even23);
        v[4 + k] = _mm512_shuffle_f32x4::<0x88>(odd01, odd23);
        v[12 + k] = _mm512_shuffle_f32x4::<0xDD>(odd01, odd23);
    }
}
