//! Microkernels and their run-time selection.
//!
//! A [`Kernel`] names a microkernel, its tile (`mr x nr`) and its GEMV helpers.
//! The AVX-512 and AVX2 kernels can only be obtained through [`avx512`] /
//! [`avx2`], which check the CPU first (`is_x86_feature_detected!`): holding a
//! `&Kernel` is the proof that calling its function pointers is sound.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod portable;

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KernelKind {
    Portable,
    Avx2,
    Avx512,
}

/// `C[..mr, ..nr] = alpha * A·B + beta * C` for one tile, `A` as [`TileA`]
/// says (rows in place only for a kernel that [`Kernel::reads_a_in_place`]),
/// and `B` a `kc x NR` micro-panel whose rows are `ldb`
/// floats apart (`NR` when packed; a row-major B's row stride when read in
/// place) (`beta == 0`: C is not read), then `fin` if given. Safety
/// contract: see each kernel's `micro`.
pub(crate) type MicroFn = unsafe fn(
    kc: usize,
    a: TileA,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
    beta: f32,
    mr: usize,
    nr: usize,
    fin: Option<&TileFinish>,
);

/// The most rows any kernel's tile has.
pub(crate) const MAX_MR: usize = 8;

/// Where one tile's A values come from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TileA {
    /// A packed `kc x MR` micro-panel: row r's value at step p is
    /// `a[p * MR + r]`.
    Packed(*const f32),
    /// Row r's `kc` values are contiguous from `rows[r]`, for `r < mr` (the
    /// rest are unused): a row-major A read in place, or rows gathered from
    /// anywhere (an implicit im2col over a channels-last input).
    Rows([*const f32; MAX_MR]),
    /// `kc / seg_len` segments of `seg_len` steps (`kc` a multiple of it):
    /// in segment `s`, row r's values are contiguous from
    /// `*ptrs.add(s * MAX_MR + r)`. A gathered A whose segments are shorter
    /// than a k block, read in one tile pass: the accumulators stay in
    /// registers from one segment to the next.
    Segments {
        ptrs: *const *const f32,
        seg_len: usize,
    },
}

/// A packed or row-wise A's first `R` rows as pointers, the step between
/// a row's values (`mr`, the panel's rows, when packed; else 1) and how far
/// ahead of a row's current value to prefetch (`ahead` steps).
#[inline(always)]
pub(crate) fn tile_rows<const R: usize>(
    a: TileA,
    mr: usize,
    ahead: usize,
) -> ([*const f32; R], usize, usize) {
    match a {
        TileA::Packed(p) => (std::array::from_fn(|r| p.wrapping_add(r)), mr, ahead * mr),
        TileA::Rows(rows) => (std::array::from_fn(|r| rows[r]), 1, ahead),
        TileA::Segments { .. } => unreachable!("segments are walked one at a time"),
    }
}

/// [`crate::Finish`] for one tile: each pointer (null for none) already
/// points at the tile's first row / column.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileFinish {
    /// `mr` values, one per tile row.
    pub row_bias: *const f32,
    /// `nr` values, one per tile column.
    pub col_bias: *const f32,
    /// An `mr x nr` block with row stride `ldr`.
    pub res: *const f32,
    pub ldr: usize,
    pub clamp: Option<(f32, f32)>,
    /// Store the tile's full, 64-byte-aligned vectors with non-temporal
    /// stores (set only for kernels with `Kernel::streams`). The driver asks
    /// for this when C is too big to stay cached for its reader (see
    /// `Blocking::stream_bytes`): a normal store first reads each line from
    /// memory, which stalls the kernel and doubles the traffic. The writer
    /// must `sfence` before another thread reads C.
    pub stream: bool,
}

impl TileFinish {
    /// The scalar finish of element (r, j) of the tile (the portable kernel
    /// and partial AVX2 tiles use it).
    ///
    /// # Safety
    /// `r` and `j` must lie inside the tile the pointers were made for.
    #[inline(always)]
    pub(crate) unsafe fn scalar(&self, r: usize, j: usize, mut x: f32) -> f32 {
        // SAFETY: the caller keeps (r, j) inside the tile, which each non-null
        // pointer covers (TileFinish's contract).
        unsafe {
            if !self.row_bias.is_null() {
                x += *self.row_bias.add(r);
            }
            if !self.col_bias.is_null() {
                x += *self.col_bias.add(j);
            }
            if !self.res.is_null() {
                x += *self.res.add(r * self.ldr + j);
            }
        }
        match self.clamp {
            Some((lo, hi)) => crate::clamp_like_clip(x, lo, hi),
            None => x,
        }
    }
}

pub(crate) struct Kernel {
    pub kind: KernelKind,
    pub name: &'static str,
    pub mr: usize,
    pub nr: usize,
    /// Whether `micro` honours `TileFinish::stream` (the others store as
    /// usual, so the driver does not ask them).
    pub streams: bool,
    /// Whether `micro` reads only the live columns of a partial tile's B
    /// rows, so a partial panel of a row-major B can be read in place (the
    /// others load whole vectors and need it packed, zero-padded).
    pub partial_b_in_place: bool,
    /// Whether `micro` takes A's rows in place ([`TileA::Rows`]) as well as
    /// packed.
    pub reads_a_in_place: bool,
    micro: MicroFn,
    axpy: unsafe fn(f32, &[f32], &mut [f32]),
    dot: unsafe fn(&[f32], &[f32]) -> f32,
    panel_gemv: unsafe fn(&[f32], &[f32], &mut [f32]),
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernel({}, {}x{})", self.name, self.mr, self.nr)
    }
}

impl Kernel {
    /// One tile; see [`MicroFn`].
    ///
    /// # Safety
    /// `a` must point to `kc * self.mr` readable floats (as rows: each of
    /// the first `mr` to `kc` readable floats), `b` to `kc` rows of
    /// `self.nr` readable floats each, `ldb >= self.nr` apart, and `c` to an
    /// `mr x nr` tile with row stride `ldc` that nothing else
    /// accesses meanwhile, with `1 <= mr <= self.mr` and `1 <= nr <= self.nr`;
    /// `fin`'s non-null pointers must cover the same `mr x nr` tile.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn micro(
        &self,
        kc: usize,
        a: TileA,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        beta: f32,
        mr: usize,
        nr: usize,
        fin: Option<&TileFinish>,
    ) {
        debug_assert!(matches!(a, TileA::Packed(_)) || self.reads_a_in_place);
        // SAFETY: pointer validity is the caller's contract; CPU support for the
        // kernel's instructions was checked when this `Kernel` was handed out.
        unsafe { (self.micro)(kc, a, b, ldb, c, ldc, alpha, beta, mr, nr, fin) }
    }

    /// `y += alpha * x` over the shorter length.
    #[inline]
    pub(crate) fn axpy(&self, alpha: f32, x: &[f32], y: &mut [f32]) {
        // SAFETY: CPU support was checked when this `Kernel` was handed out;
        // the helper bounds every access by the slices' lengths.
        unsafe { (self.axpy)(alpha, x, y) }
    }

    /// `sum x[p] * y[p]` over the shorter length.
    #[inline]
    pub(crate) fn dot(&self, x: &[f32], y: &[f32]) -> f32 {
        // SAFETY: as in `axpy`.
        unsafe { (self.dot)(x, y) }
    }

    /// `out[j] = sum_p x[p] * panel[p * nr + j]` for one packed B panel of
    /// `x.len()` rows (`panel` holds at least `x.len() * nr` floats, `out` at
    /// most `nr` values).
    #[inline]
    pub(crate) fn panel_gemv(&self, x: &[f32], panel: &[f32], out: &mut [f32]) {
        assert!(panel.len() >= x.len() * self.nr && out.len() <= self.nr);
        // SAFETY: CPU support was checked when this `Kernel` was handed out;
        // the helper indexes slices (bounds-checked) only.
        unsafe { (self.panel_gemv)(x, panel, out) }
    }
}

static PORTABLE: Kernel = Kernel {
    kind: KernelKind::Portable,
    name: if cfg!(target_arch = "aarch64") {
        "portable-8x12"
    } else {
        "portable-4x8"
    },
    mr: portable::MR,
    nr: portable::NR,
    streams: false,
    partial_b_in_place: false,
    reads_a_in_place: false,
    micro: portable::micro,
    axpy: portable_axpy,
    dot: portable_dot,
    panel_gemv: portable_panel_gemv,
};

unsafe fn portable_panel_gemv(x: &[f32], panel: &[f32], out: &mut [f32]) {
    portable::panel_gemv(x, panel, out)
}

unsafe fn portable_axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    portable::axpy(alpha, x, y)
}

unsafe fn portable_dot(x: &[f32], y: &[f32]) -> f32 {
    portable::dot(x, y)
}

pub(crate) fn portable() -> &'static Kernel {
    &PORTABLE
}

/// The AVX-512F kernel, if this CPU has AVX-512F.
pub(crate) fn avx512() -> Option<&'static Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        static K: Kernel = Kernel {
            kind: KernelKind::Avx512,
            name: "avx512-6x64",
            mr: avx512::MR,
            nr: avx512::NR,
            streams: true,
            partial_b_in_place: true,
            reads_a_in_place: true,
            micro: avx512::micro,
            axpy: avx512::axpy,
            dot: avx512::dot,
            panel_gemv: avx512::panel_gemv,
        };
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(&K);
        }
    }
    None
}

/// The AVX2+FMA kernel, if this CPU has both.
pub(crate) fn avx2() -> Option<&'static Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        static K: Kernel = Kernel {
            kind: KernelKind::Avx2,
            name: "avx2-6x16",
            mr: avx2::MR,
            nr: avx2::NR,
            streams: false,
            partial_b_in_place: false,
            reads_a_in_place: true,
            micro: avx2::micro,
            axpy: avx2::axpy,
            dot: avx2::dot,
            panel_gemv: avx2::panel_gemv,
        };
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Some(&K);
        }
    }
    None
}

/// The kernel for packed operands of `kind` (it was available when they were packed).
pub(crate) fn of_kind(kind: KernelKind) -> &'static Kernel {
    match kind {
        KernelKind::Portable => portable(),
        KernelKind::Avx2 => avx2().expect("operand packed for AVX2 on a CPU without it"),
        KernelKind::Avx512 => avx512().expect("operand packed for AVX-512 on a CPU without it"),
    }
}

/// Every kernel this CPU can run (for tests and benchmarks).
pub(crate) fn available() -> Vec<&'static Kernel> {
    let mut v = vec![portable()];
    v.extend(avx2());
    v.extend(avx512());
    v
}

/// The best kernel for this CPU, chosen once. `KILN_GEMM_KERNEL=portable|avx2|avx512`
/// picks a lower one (for comparisons); an unknown or unavailable name is ignored.
pub(crate) fn selected() -> &'static Kernel {
    static SEL: OnceLock<&'static Kernel> = OnceLock::new();
    SEL.get_or_init(|| {
        let forced = std::env::var("KILN_GEMM_KERNEL").ok();
        let by_name = match forced.as_deref() {
            Some("portable") => Some(portable()),
            Some("avx2") => avx2(),
            Some("avx512") => avx512(),
            _ => None,
        };
        by_name
            .or_else(avx512)
            .or_else(avx2)
            .unwrap_or_else(portable)
    })
}
