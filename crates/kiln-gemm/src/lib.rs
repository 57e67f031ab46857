//! kiln's f32 GEMM: `C = alpha * A·B + beta * C`, then an optional epilogue
//! (bias, activation, residual) applied to each finished block of C while it is
//! still in cache.
//!
//! Operands are strided views ([`MatRef`]) or operands packed once ahead of time
//! ([`PackedA`], [`PackedB`]: constant weights are packed at plan time, not on
//! every run). Work is split over the rayon pool the caller runs in.
//!
//! [`sgemm_reference`] is the plain triple loop every fast path is tested against.

mod driver;
mod gemv;
mod kernels;
mod pack;
#[cfg(target_arch = "x86_64")]
pub use pack::transpose16;
#[cfg(test)]
mod tests;

use kernels::{Kernel, KernelKind};
use pack::AlignedBuf;

/// A read-only strided view of a `rows x cols` f32 matrix: element `(i, j)` is
/// `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A strided view. Panics if the view reaches past `data` (a caller bug, not
    /// bad user input: kernels check shapes before building views).
    pub fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> MatRef<'a> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
            assert!(
                last < data.len(),
                "MatRef {rows}x{cols} strides ({row_stride}, {col_stride}) needs {} elements, slice has {}",
                last + 1,
                data.len()
            );
        }
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// A contiguous row-major matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> MatRef<'a> {
        MatRef::new(data, rows, cols, cols, 1)
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> MatRef<'a> {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    pub fn col_stride(&self) -> usize {
        self.col_stride
    }

    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    #[inline(always)]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// The left operand (`m x k`), packed once for the microkernel selected at pack
/// time: `MR`-row micro-panels spanning all of k, stored k-major, the last one
/// zero-padded. Pack constant weights once (at plan time) and reuse them.
#[derive(Clone, Debug)]
pub struct PackedA {
    m: usize,
    k: usize,
    kind: KernelKind,
    mr: usize,
    data: AlignedBuf,
}

impl PackedA {
    pub fn new(a: MatRef<'_>) -> PackedA {
        PackedA::for_kernel(kernels::selected(), a)
    }

    pub(crate) fn for_kernel(kernel: &'static Kernel, a: MatRef<'_>) -> PackedA {
        let (m, k, mr) = (a.rows, a.cols, kernel.mr);
        let mut data = AlignedBuf::zeroed(m.div_ceil(mr) * mr * k);
        pack::pack_a(a, mr, data.as_mut_slice());
        PackedA {
            m,
            k,
            kind: kernel.kind,
            mr,
            data,
        }
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Element `(i, p)` (slow; for tests and odd paths).
    pub fn get(&self, i: usize, p: usize) -> f32 {
        assert!(
            i < self.m && p < self.k,
            "PackedA::get({i}, {p}) of {}x{}",
            self.m,
            self.k
        );
        let (ip, r) = (i / self.mr, i % self.mr);
        self.data.as_slice()[ip * self.mr * self.k + p * self.mr + r]
    }

    /// The matrix back in row-major order.
    pub fn to_row_major(&self) -> Vec<f32> {
        let mut v = Vec::with_capacity(self.m * self.k);
        for i in 0..self.m {
            v.extend((0..self.k).map(|p| self.get(i, p)));
        }
        v
    }
}

/// The right operand (`k x n`), packed once for the microkernel selected at pack
/// time: `NR`-column micro-panels spanning all of k, stored k-major, the last
/// one zero-padded. Pack constant weights once (at plan time) and reuse them.
#[derive(Clone, Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    kind: KernelKind,
    nr: usize,
    data: AlignedBuf,
}

impl PackedB {
    pub fn new(b: MatRef<'_>) -> PackedB {
        PackedB::for_kernel(kernels::selected(), b)
    }

    pub(crate) fn for_kernel(kernel: &'static Kernel, b: MatRef<'_>) -> PackedB {
        let (k, n, nr) = (b.rows, b.cols, kernel.nr);
        let mut data = AlignedBuf::zeroed(n.div_ceil(nr) * nr * k);
        pack::pack_b(b, nr, data.as_mut_slice());
        PackedB {
            k,
            n,
            kind: kernel.kind,
            nr,
            data,
        }
    }

    pub fn rows(&self) -> usize {
        self.k
    }

    pub fn cols(&self) -> usize {
        self.n
    }

    /// Element `(p, j)` (slow; for tests and odd paths).
    pub fn get(&self, p: usize, j: usize) -> f32 {
        assert!(
            p < self.k && j < self.n,
            "PackedB::get({p}, {j}) of {}x{}",
            self.k,
            self.n
        );
        let (jq, c) = (j / self.nr, j % self.nr);
        self.data.as_slice()[jq * self.nr * self.k + p * self.nr + c]
    }

    /// Copies column `j` (all `rows()` elements) into `out`, which must be
    /// exactly that long: a row of B^T, such as one embedding vector when B
    /// is a tied embedding table's transpose.
    pub fn column_into(&self, j: usize, out: &mut [f32]) {
        assert!(
            j < self.n && out.len() == self.k,
            "PackedB::column_into({j}, len {}) of {}x{}",
            out.len(),
            self.k,
            self.n
        );
        let (jq, c) = (j / self.nr, j % self.nr);
        let panel = &self.data.as_slice()[jq * self.nr * self.k..][..self.nr * self.k];
        for (o, row) in out.iter_mut().zip(panel.chunks_exact(self.nr)) {
            *o = row[c];
        }
    }

    /// The matrix back in row-major order.
    pub fn to_row_major(&self) -> Vec<f32> {
        let mut v = Vec::with_capacity(self.k * self.n);
        for p in 0..self.k {
            v.extend((0..self.n).map(|j| self.get(p, j)));
        }
        v
    }
}

/// Writes one micro-panel of a [`Panels`] operand: `fill(first, width, panel)`.
pub type PanelFill<'a> = dyn Fn(usize, usize, &mut [f32]) + Sync + 'a;

/// An operand that the caller packs itself, panel by panel, so that it never
/// exists as a matrix (an implicit im2col, say: the packing *is* the gather).
///
/// As A (`rows x cols` = `m x k`), `fill(i0, mr, panel)` must set
/// `panel[p * mr + r] = A[i0 + r, p]` for every `p < k`, `r < mr`, writing
/// zeros for rows at or past `m`. As B (`k x n`), `fill(j0, nr, panel)` sets
/// `panel[p * nr + c] = B[p, j0 + c]`, zeros at or past column `n`. Every
/// element of `panel` must be written; panels may be filled from several
/// threads at once.
#[derive(Clone, Copy)]
pub struct Panels<'a> {
    pub rows: usize,
    pub cols: usize,
    pub fill: &'a PanelFill<'a>,
}

impl std::fmt::Debug for Panels<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Panels({}x{})", self.rows, self.cols)
    }
}

/// Marks a [`Gather`] segment that is all zeros.
pub const GATHER_ZEROS: usize = usize::MAX;

/// Where the rows of a [`Gather`] read: per row, per segment, an offset
/// into the data, or [`GATHER_ZEROS`]. Built once (it scans its offsets for
/// the largest), so each product checks it against the data in O(1).
#[derive(Clone, Debug)]
pub struct GatherTable {
    offsets: Vec<usize>,
    segs: usize,
    /// The largest offset that is not `GATHER_ZEROS`.
    max_offset: Option<usize>,
}

impl GatherTable {
    /// `offsets[i * segs + t]`: row `i`'s segment `t`. Panics unless `segs
    /// > 0` and the offsets fill whole rows.
    pub fn new(offsets: Vec<usize>, segs: usize) -> GatherTable {
        assert!(
            segs > 0 && offsets.len().is_multiple_of(segs),
            "GatherTable: {} offsets are not whole rows of {segs} segments",
            offsets.len()
        );
        let max_offset = offsets.iter().copied().filter(|&o| o != GATHER_ZEROS).max();
        GatherTable {
            offsets,
            segs,
            max_offset,
        }
    }

    /// Rows (of one image).
    pub fn rows(&self) -> usize {
        self.offsets.len() / self.segs
    }

    pub fn segs(&self) -> usize {
        self.segs
    }
}

/// An A (`m x k`) whose rows are gathered from segments of one slice, in
/// `images` blocks of the same pattern: row `b * table.rows() + i` is
/// `table.segs()` segments of `seg_len` floats, segment `t` read from
/// `data[b * image_stride + o..]` where `o` is the table's offset for row
/// `i`, segment `t`, or zeros where that is [`GATHER_ZEROS`]. This is an
/// implicit im2col over a channels-last input (a row is an output
/// position, a segment one tap's channels, zeros a tap in the padding, a
/// block one image): kernels that read A's rows in place read every
/// segment where it lies, so nothing is packed or copied; the others pack.
#[derive(Clone, Copy)]
pub struct Gather<'a> {
    pub data: &'a [f32],
    pub table: &'a GatherTable,
    pub seg_len: usize,
    pub images: usize,
    pub image_stride: usize,
}

impl Gather<'_> {
    pub fn rows(&self) -> usize {
        self.images * self.table.rows()
    }

    pub fn cols(&self) -> usize {
        self.table.segs * self.seg_len
    }

    /// Panics unless every segment of every image lies inside `data` (a
    /// caller bug).
    fn check(&self) {
        let Some(max) = self.table.max_offset else {
            return;
        };
        let end = self
            .images
            .saturating_sub(1)
            .checked_mul(self.image_stride)
            .and_then(|last| last.checked_add(max))
            .and_then(|o| o.checked_add(self.seg_len));
        assert!(
            self.images == 0 || end.is_some_and(|e| e <= self.data.len()),
            "sgemm: a gather segment (offset {max} + {}, {} images {} apart) is outside its {} floats",
            self.seg_len,
            self.images,
            self.image_stride,
            self.data.len()
        );
    }

    /// Where row `i`'s segment `t` starts in `data` (None: zeros).
    #[inline]
    pub(crate) fn segment(&self, i: usize, t: usize) -> Option<usize> {
        let (offsets, base) = self.row(i);
        match offsets[t] {
            GATHER_ZEROS => None,
            o => Some(o + base),
        }
    }

    /// Row `i`'s segment offsets (in its image, [`GATHER_ZEROS`] for zeros)
    /// and its image's offset in `data`: one division for all of a row's
    /// segments.
    pub(crate) fn row(&self, i: usize) -> (&[usize], usize) {
        let (per, segs) = (self.table.rows(), self.table.segs);
        let (img, r) = (i / per, i % per);
        (
            &self.table.offsets[r * segs..(r + 1) * segs],
            img * self.image_stride,
        )
    }

    /// Row `i`'s values `p0 .. p0 + out.len()` (within one segment).
    fn read(&self, i: usize, p0: usize, out: &mut [f32]) {
        let (t, q) = (p0 / self.seg_len, p0 % self.seg_len);
        debug_assert!(q + out.len() <= self.seg_len);
        match self.segment(i, t) {
            None => out.fill(0.0),
            Some(o) => out.copy_from_slice(&self.data[o + q..o + q + out.len()]),
        }
    }

    /// The whole matrix, row-major (for the reference and packing kernels).
    fn to_row_major(&self) -> Vec<f32> {
        let k = self.cols();
        let mut dense = vec![0.0; self.rows() * k];
        for (i, row) in dense.chunks_exact_mut(k.max(1)).enumerate() {
            for (t, seg) in row.chunks_exact_mut(self.seg_len.max(1)).enumerate() {
                self.read(i, t * self.seg_len, seg);
            }
        }
        dense
    }
}

impl std::fmt::Debug for Gather<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Gather({}x{} in {} segments)",
            self.rows(),
            self.cols(),
            self.table.segs
        )
    }
}

/// The left operand of one product.
#[derive(Clone, Copy, Debug)]
pub enum Lhs<'a> {
    Mat(MatRef<'a>),
    Packed(&'a PackedA),
    Panels(Panels<'a>),
    Gather(Gather<'a>),
}

/// The right operand of one product.
#[derive(Clone, Copy, Debug)]
pub enum Rhs<'a> {
    Mat(MatRef<'a>),
    Packed(&'a PackedB),
    Panels(Panels<'a>),
}

impl Lhs<'_> {
    pub fn rows(&self) -> usize {
        match self {
            Lhs::Mat(a) => a.rows,
            Lhs::Packed(a) => a.m,
            Lhs::Panels(a) => a.rows,
            Lhs::Gather(a) => a.rows(),
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Lhs::Mat(a) => a.cols,
            Lhs::Packed(a) => a.k,
            Lhs::Panels(a) => a.cols,
            Lhs::Gather(a) => a.cols(),
        }
    }
}

impl Rhs<'_> {
    pub fn rows(&self) -> usize {
        match self {
            Rhs::Mat(b) => b.rows,
            Rhs::Packed(b) => b.k,
            Rhs::Panels(b) => b.rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Rhs::Mat(b) => b.cols,
            Rhs::Packed(b) => b.n,
            Rhs::Panels(b) => b.cols,
        }
    }
}

/// Called once for every finished piece of C, with the piece's row, its first
/// column and its values (`vals[j]` is `C[row, col0 + j]`). The pieces of one
/// product cover C exactly once; they may be called from several threads.
pub type Epilogue<'a> = dyn Fn(usize, usize, &mut [f32]) + Sync + 'a;

/// A matrix added to the product element by element: `R[i, j]` is
/// `data[i * ld + j]`.
#[derive(Clone, Copy, Debug)]
pub struct Residual<'a> {
    pub data: &'a [f32],
    pub ld: usize,
}

/// The common epilogues, done by the microkernel in registers on each tile's
/// last k block, before the tile is stored: no second pass over C, no call
/// per row. In this order, after `alpha * A·B + beta * C`:
/// `+ row_bias[i]`, `+ col_bias[j]`, `+ residual[i, j]`, then `clamp`
/// (`x < lo ? lo : x`, then `> hi ? hi : ..`; NaN and -0.0 pass, as in the
/// Relu and Clip ops). A general [`Epilogue`] still runs after all of it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Finish<'a> {
    /// One value per row of C (`len >= m`): a conv's per-channel bias.
    pub row_bias: Option<&'a [f32]>,
    /// One value per column of C (`len >= n`): a MatMul/Gemm bias.
    pub col_bias: Option<&'a [f32]>,
    /// An `m x n` matrix to add (a residual connection).
    pub residual: Option<Residual<'a>>,
    /// `(lo, hi)`: Relu is `(0, inf)`, Relu6 `(0, 6)`.
    pub clamp: Option<(f32, f32)>,
    /// Not an epilogue but a hint: C is one piece of an output of at least
    /// [`stream_min_bytes`] (a conv's batch of planes), so store it with
    /// streaming stores as if C itself were that big. The product streams
    /// by itself when C is.
    pub stream: bool,
}

impl Finish<'_> {
    pub fn is_none(&self) -> bool {
        self.row_bias.is_none()
            && self.col_bias.is_none()
            && self.residual.is_none()
            && self.clamp.is_none()
    }

    /// The plain definition on one piece of row `row` starting at column
    /// `col0`: what the kernels do in registers, and their test reference.
    pub fn apply(&self, row: usize, col0: usize, vals: &mut [f32]) {
        let len = vals.len();
        if let Some(b) = self.row_bias {
            let bv = b[row];
            vals.iter_mut().for_each(|v| *v += bv);
        }
        if let Some(b) = self.col_bias {
            vals.iter_mut()
                .zip(&b[col0..col0 + len])
                .for_each(|(v, &bv)| *v += bv);
        }
        if let Some(r) = self.residual {
            let o = row * r.ld + col0;
            vals.iter_mut()
                .zip(&r.data[o..o + len])
                .for_each(|(v, &rv)| *v += rv);
        }
        if let Some((lo, hi)) = self.clamp {
            vals.iter_mut()
                .for_each(|v| *v = clamp_like_clip(*v, lo, hi));
        }
    }

    /// Panics unless every slice covers an `m x n` C (a caller bug).
    fn check(&self, m: usize, n: usize) {
        if let Some(b) = self.row_bias {
            assert!(
                b.len() >= m,
                "sgemm: row_bias has {} values, C has {m} rows",
                b.len()
            );
        }
        if let Some(b) = self.col_bias {
            assert!(
                b.len() >= n,
                "sgemm: col_bias has {} values, C has {n} columns",
                b.len()
            );
        }
        if let Some(r) = self.residual {
            assert!(r.ld >= n, "sgemm: residual ld {} < n {n}", r.ld);
            if m > 0 && n > 0 {
                assert!(
                    r.data.len() >= (m - 1) * r.ld + n,
                    "sgemm: residual has {} elements, needs {}",
                    r.data.len(),
                    (m - 1) * r.ld + n
                );
            }
        }
    }
}

/// `x < lo ? lo : x`, then `> hi ? hi : ..` (NaN passes).
#[inline(always)]
pub(crate) fn clamp_like_clip(x: f32, lo: f32, hi: f32) -> f32 {
    let r = if x < lo { lo } else { x };
    if r > hi {
        hi
    } else {
        r
    }
}

/// `C = alpha * A·B + beta * C`, then `epilogue` over every element of C.
///
/// C is `m x n` row-major with row stride `ldc` (`c.len() >= (m-1)*ldc + n`).
/// With `beta == 0` C's old contents are ignored (NaN included), as in BLAS.
/// Panics if the shapes disagree (a caller bug: kernels validate first).
pub fn sgemm(
    alpha: f32,
    a: Lhs<'_>,
    b: Rhs<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
    epilogue: Option<&Epilogue<'_>>,
) {
    sgemm_fused(alpha, a, b, beta, c, ldc, &Finish::default(), epilogue)
}

/// [`sgemm`] with the common epilogues done in registers ([`Finish`]), before
/// the general `epilogue`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_fused(
    alpha: f32,
    a: Lhs<'_>,
    b: Rhs<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
    finish: &Finish<'_>,
    epilogue: Option<&Epilogue<'_>>,
) {
    // Packed operands carry the kernel they were packed for.
    let kernel = match (&a, &b) {
        (Lhs::Packed(p), _) => kernels::of_kind(p.kind),
        (_, Rhs::Packed(p)) => kernels::of_kind(p.kind),
        _ => kernels::selected(),
    };
    sgemm_with(kernel, alpha, a, b, beta, c, ldc, finish, epilogue)
}

/// Outputs of at least this many bytes are stored with streaming stores
/// (AVX-512, on rows that start on a 64-byte line), which skip reading each
/// line before writing it: a third of the last-level cache.
/// `KILN_GEMM_STREAM_BYTES` overrides it. (A product of depth 32 or less
/// also streams outputs from the L2 size up, whatever this says; see the
/// driver's `SHALLOW_K`.)
pub fn stream_min_bytes() -> usize {
    driver::blocking_cached(kernels::selected()).stream_bytes
}

/// The name of the microkernel `sgemm` uses on this CPU, e.g. `avx512-6x64`.
pub fn selected_kernel() -> &'static str {
    kernels::selected().name
}

/// Whether `sgemm` on this CPU reads a [`Gather`] A where its segments
/// lie (else it packs it first, a copy of the whole im2col matrix).
pub fn gathers_in_place() -> bool {
    kernels::selected().reads_a_in_place
}

/// The tile (`MR` rows x `NR` columns of C) of the microkernel `sgemm` uses
/// on this CPU: packed operands are padded to multiples of it.
pub fn selected_tile() -> (usize, usize) {
    let k = kernels::selected();
    (k.mr, k.nr)
}

/// `sgemm` with an explicit kernel (tests force each available one through this).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_with(
    kernel: &'static Kernel,
    alpha: f32,
    a: Lhs<'_>,
    b: Rhs<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
    finish: &Finish<'_>,
    epilogue: Option<&Epilogue<'_>>,
) {
    let (m, k, n) = check_dims(&a, &b, c.len(), ldc);
    finish.check(m, n);
    if let Lhs::Gather(g) = &a {
        g.check();
    }
    if m == 0 || n == 0 {
        return;
    }
    // The paths that do not reach the microkernel apply `finish` with the
    // general epilogue, as one callback; the driver runs `finish` in the
    // microkernel and the general epilogue after it.
    let user_epilogue = epilogue;
    let both = |i: usize, j0: usize, vals: &mut [f32]| {
        finish.apply(i, j0, vals);
        if let Some(e) = epilogue {
            e(i, j0, vals);
        }
    };
    let epilogue: Option<&Epilogue<'_>> = if finish.is_none() {
        epilogue
    } else {
        Some(&both)
    };
    if k == 0 {
        // A·B is all zeros: C = beta * C.
        for i in 0..m {
            let row = &mut c[i * ldc..i * ldc + n];
            if beta == 0.0 {
                row.fill(0.0);
            } else {
                row.iter_mut().for_each(|v| *v *= beta);
            }
            if let Some(e) = epilogue {
                e(i, 0, row);
            }
        }
        return;
    }
    let caller_packed = matches!(a, Lhs::Panels(_) | Lhs::Gather(_)) || matches!(b, Rhs::Panels(_));
    if m == 1 && n == 1 && !caller_packed {
        let x: Vec<f32> = (0..k).map(|p| gemv::a_at(&a, 0, p)).collect();
        let y: Vec<f32> = (0..k).map(|p| gemv::b_at(&b, p, 0)).collect();
        let s = kernel.dot(&x, &y);
        c[0] = if beta == 0.0 {
            alpha * s
        } else {
            alpha * s + beta * c[0]
        };
        if let Some(e) = epilogue {
            e(0, 0, &mut c[..1]);
        }
        return;
    }
    if m == 1 && !caller_packed && gemv::row_times_matrix(kernel, alpha, &a, &b, beta, c, epilogue)
    {
        return;
    }
    if n == 1
        && !caller_packed
        && gemv::matrix_times_col(kernel, alpha, &a, &b, beta, c, ldc, epilogue)
    {
        return;
    }
    // A row-major A is read in place by a kernel that can: packing it was a
    // pass of its own, with its own fork and join, before the product.
    let a_rows = match a {
        Lhs::Mat(v) if a_in_place_applies(kernel, v) => Some((v.data(), v.row_stride())),
        _ => None,
    };
    // A gathered A is read where its segments lie, by a kernel that can.
    let a_gather = match a {
        Lhs::Gather(g) if kernel.reads_a_in_place => Some(g),
        _ => None,
    };
    let pa = match a {
        _ if a_rows.is_some() || a_gather.is_some() => driver::Packed::Borrowed(&[]),
        Lhs::Packed(p) if p.kind == kernel.kind => driver::Packed::Borrowed(p.data.as_slice()),
        Lhs::Packed(p) => {
            let rm = p.to_row_major();
            driver::pack_a_now(MatRef::row_major(&rm, m, k), kernel.mr)
        }
        Lhs::Mat(v) => driver::pack_a_now(v, kernel.mr),
        Lhs::Panels(p) => driver::fill_a_now(&p, kernel.mr),
        Lhs::Gather(g) => {
            let dense = g.to_row_major();
            driver::pack_a_now(MatRef::row_major(&dense, m, k), kernel.mr)
        }
    };
    // A row-major B is read in place where packing it would cost a
    // noticeable share of the product (see `direct_b_applies`).
    let direct = match b {
        Rhs::Mat(v) if direct_b_applies(kernel, m, v) => Some((
            v,
            (!kernel.partial_b_in_place)
                .then(|| driver::pack_b_tail_now(v, kernel.nr))
                .flatten(),
        )),
        _ => None,
    };
    let pb = match b {
        _ if direct.is_some() => driver::Packed::Borrowed(&[]),
        Rhs::Packed(p) if p.kind == kernel.kind => driver::Packed::Borrowed(p.data.as_slice()),
        Rhs::Packed(p) => {
            let rm = p.to_row_major();
            driver::pack_b_now(MatRef::row_major(&rm, k, n), kernel.nr)
        }
        Rhs::Mat(v) => driver::pack_b_now(v, kernel.nr),
        Rhs::Panels(p) => driver::fill_b_now(&p, kernel.nr),
    };
    let job = driver::Job {
        kernel,
        m,
        n,
        k,
        alpha,
        beta,
        a: pa.data(),
        a_rows,
        a_gather,
        b: pb.data(),
        b_direct: direct.as_ref().map(|(v, tail)| driver::DirectB {
            data: v.data(),
            ld: v.row_stride(),
            tail: tail.as_ref().map_or(&[], |t| t.data()),
        }),
        ldc,
        finish,
        epilogue: user_epilogue,
    };
    driver::gemm_packed(&job, c);
}

/// Whether [`sgemm_with`] reads this A (`m x k`) in place: a kernel that
/// can, and contiguous rows (unit column stride, rows apart by at least k).
fn a_in_place_applies(kernel: &Kernel, a: MatRef<'_>) -> bool {
    kernel.reads_a_in_place && a.col_stride() == 1 && a.row_stride() >= a.cols()
}

/// Most rows of C (of A) for which a row-major B is read in place by the
/// microkernel rather than packed first: packing B costs about one copy of
/// it, the product `m` multiply-adds per element of B, so packing is a share
/// of about `1 / m`. Measured (criterion, MobileNetV2/ResNet-50 pointwise
/// shapes): m = 16 and 24 ran 36-49% faster in place, m = 96 and 256 1-6%
/// slower (strided rows of B are re-read from L2 for every row panel of A).
const DIRECT_B_MAX_M: usize = 64;

/// Whether [`sgemm_with`] reads this B (`k x n`) in place: contiguous rows
/// (unit column stride, rows apart by at least `n`), at least one full
/// panel of columns, and few enough rows of C.
pub(crate) fn direct_b_applies(kernel: &Kernel, m: usize, b: MatRef<'_>) -> bool {
    b.col_stride() == 1
        && b.row_stride() >= b.cols()
        && direct_b_fits(kernel, m, b.rows(), b.cols())
}

/// The shape half of [`direct_b_applies`], for a `k x n` B.
fn direct_b_fits(kernel: &Kernel, m: usize, k: usize, n: usize) -> bool {
    // A kernel that reads partial panels in place packs nothing at all; a
    // B that small stays in L2 for every row panel's re-read.
    let whole_in_place =
        kernel.partial_b_in_place && k * n * std::mem::size_of::<f32>() <= DIRECT_B_MAX_BYTES;
    (m <= DIRECT_B_MAX_M && (n >= kernel.nr || kernel.partial_b_in_place)) || whole_in_place
}

/// Whether `sgemm` on this CPU reads a row-major `k x n` B (rows `n` apart)
/// in place, packing nothing, for a product with `m` rows.
pub fn reads_b_in_place(m: usize, k: usize, n: usize) -> bool {
    direct_b_fits(kernels::selected(), m, k, n)
}

/// Largest B read in place whatever the rows of C, with no panel packed
/// (see [`direct_b_applies`]).
const DIRECT_B_MAX_BYTES: usize = 256 << 10;

/// The plain definition, for tests: `C = alpha * A·B + beta * C` then the
/// epilogue row by row, one dot product per element accumulated in f64.
pub fn sgemm_reference(
    alpha: f32,
    a: Lhs<'_>,
    b: Rhs<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
    epilogue: Option<&Epilogue<'_>>,
) {
    let (m, k, n) = check_dims(&a, &b, c.len(), ldc);
    // Caller-packed operands are unpacked to plain matrices first.
    let a_dense;
    let a = match a {
        Lhs::Panels(p) => {
            a_dense = pack::unpack_panels(&p, false);
            Lhs::Mat(MatRef::row_major(&a_dense, m, k))
        }
        Lhs::Gather(g) => {
            a_dense = g.to_row_major();
            Lhs::Mat(MatRef::row_major(&a_dense, m, k))
        }
        other => other,
    };
    let b_dense;
    let b = match b {
        Rhs::Panels(p) => {
            b_dense = pack::unpack_panels(&p, true);
            Rhs::Mat(MatRef::row_major(&b_dense, k, n))
        }
        other => other,
    };
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|p| gemv::a_at(&a, i, p) as f64 * gemv::b_at(&b, p, j) as f64)
                .sum();
            let old = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c[i * ldc + j] as f64
            };
            c[i * ldc + j] = (alpha as f64 * dot + old) as f32;
        }
        if let Some(e) = epilogue {
            e(i, 0, &mut c[i * ldc..i * ldc + n]);
        }
    }
}

fn check_dims(a: &Lhs<'_>, b: &Rhs<'_>, c_len: usize, ldc: usize) -> (usize, usize, usize) {
    let (m, k) = (a.rows(), a.cols());
    let (kb, n) = (b.rows(), b.cols());
    assert_eq!(k, kb, "sgemm: A is {m}x{k} but B is {kb}x{n}");
    assert!(ldc >= n, "sgemm: ldc {ldc} < n {n}");
    if m > 0 && n > 0 {
        assert!(
            c_len >= (m - 1) * ldc + n,
            "sgemm: C has {c_len} elements, needs {}",
            (m - 1) * ldc + n
        );
    }
    (m, k, n)
}
