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
        // A transposed view: each column is contiguous in k.
        for c in 0..cols {
            let src = &data[(j0 + c) * cs..(j0 + c) * cs + k];
            for (p, &v) in src.iter().enumerate() {
                dst[p * nr + c] = v;
            }
        }
    } else {
        for p in 0..k {
            for c in 0..cols {
                dst[p * nr + c] = data[p * rs + (j0 + c) * cs];
            }
        }
    }
}
