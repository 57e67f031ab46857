//! The blocked GEMM driver.
//!
//! Both operands are first brought into the packed layout of [`crate::pack`]
//! (already so for `PackedA`/`PackedB`; packed per call, in parallel, into
//! reusable shared spare buffers otherwise). C is then cut into a grid of tasks,
//! each `mc` rows (a multiple of MR) by `ncb` NR-panels. A task walks k in
//! blocks of `kc`; inside a block it takes one A micro-panel (`MR x kc`, which
//! stays in L1) against each B micro-panel of its column range (the `kc x ncb*NR`
//! B block stays in L2 and is reused by every A panel of the task). On the last
//! k block the microkernel also applies the [`Finish`] (bias, residual,
//! clamp) in registers, and the general epilogue runs on each A panel's row
//! strip right after its tiles are stored, while the strip is still in L1/L2.
//! Tasks run on the caller's rayon pool; the packed operands are shared by all
//! of them.

use crate::kernels::{Kernel, TileA, TileFinish, MAX_MR};
use crate::pack::{self, AlignedBuf};
use crate::{Epilogue, Finish, MatRef};
use rayon::prelude::*;
use std::sync::{Mutex, OnceLock};

/// Cache-derived block sizes for one kernel.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Blocking {
    /// Most k per block (a product's blocks are evened out below it, see
    /// [`balanced_kc`]).
    pub kc: usize,
    /// NR-panels of B per task (the `kc x ncb*NR` B block fills about half of L2).
    pub ncb: usize,
    /// `ncb` was set by `KILN_GEMM_NCB` (else a product with shallower k
    /// blocks widens it, keeping the B block's bytes).
    pub ncb_fixed: bool,
    /// Most MR-panels of A per task.
    pub mcb: usize,
    /// C of at least this many bytes is stored with streaming stores (see
    /// `TileFinish::stream`): a third of the last-level cache.
    pub stream_bytes: usize,
    /// C of at least this many bytes streams too when the product is
    /// shallow (k <= [`SHALLOW_K`]): the L2 size.
    pub shallow_stream_bytes: usize,
}

/// Deepest product whose big outputs stream past the caches even below
/// `Blocking::stream_bytes`. With k this small the microkernel does 2k
/// flops per float it stores, so it waits on its stores, and each store to
/// a line not in the caches first reads the line: streaming halves that
/// traffic. MobileNetV2 at batch 1 on 2 threads (its 16 -> 96 and 24 -> 144
/// expansions, 4.8 and 1.8 MB outputs read by a depthwise conv right after):
/// 3.08 -> 2.82 ms. Deeper products keep their outputs in the caches:
/// streaming every output above 1.5 MB made ResNet-50 (k >= 64) 4% slower.
pub(crate) const SHALLOW_K: usize = 32;

/// Flops per task a product is cut into, past four tasks per thread.
const TASK_FLOPS: f64 = 6e6;

/// Below this many flops (2mnk) a product runs on the caller's thread.
pub(crate) const PAR_MIN_FLOPS: f64 = 4e6;

pub(crate) fn blocking(kernel: &Kernel) -> Blocking {
    let caches = &kiln_hw::cpu().caches;
    let l1 = caches.l1d.unwrap_or(32 << 10).clamp(16 << 10, 256 << 10);
    let l2 = caches.l2.unwrap_or(512 << 10).clamp(128 << 10, 8 << 20);
    let f = std::mem::size_of::<f32>();
    // The A micro-panel (MR x kc) takes up to half of L1, leaving room for
    // the B rows streaming through and the C tile. (A third, at most 512,
    // split BERT's and GPT-2's k = 768 into 512 + 256, each block storing
    // and reloading C: on 2 threads, packed B streaming from memory, one
    // block of 768 made 1024 x 768 x 3072 413 -> 473 GFLOP/s (median) and
    // GPT-2's LM head 1024 x 768 x 50257 434 -> 461; 128 x 768 x 3072
    // 420 -> 434.)
    let mut kc = (l1 / 2 / (kernel.mr * f)).clamp(64, 1024);
    if let Some(v) = env_usize("KILN_GEMM_KC") {
        kc = v.max(1);
    }
    // The B block (kc x ncb*NR) fills about half of L2.
    let mut ncb = (l2 / 2 / (kc * kernel.nr * f)).max(1);
    let ncb_env = env_usize("KILN_GEMM_NCB");
    if let Some(v) = ncb_env {
        ncb = v.max(1);
    }
    let mut mcb = (192 / kernel.mr).max(1);
    if let Some(v) = env_usize("KILN_GEMM_MCB") {
        mcb = v.max(1);
    }
    // An output that big leaves the last-level cache before its reader gets
    // to it, or shares it with the reader's other operands; streaming skips
    // the read of each line before its store, which otherwise stalls the
    // microkernel. MobileNetV2 at batch 8 (32 MiB L3): its 38 MiB 16 -> 96
    // output 2.4 -> 1.4 ms, the 14 MiB 24 -> 144 ones 1.0 -> 0.6 ms, their
    // depthwise readers within 0.05 ms; BERT's 12 MiB FFN outputs and
    // ResNet-50's 25 MiB ones at batch 8 within noise.
    let mut stream_bytes = caches.l3.or(caches.l2).unwrap_or(32 << 20) / 3;
    if let Some(v) = env_usize("KILN_GEMM_STREAM_BYTES") {
        stream_bytes = v;
    }
    let mut shallow_stream_bytes = caches.l2.unwrap_or(1 << 20);
    if let Some(v) = env_usize("KILN_GEMM_SHALLOW_STREAM_BYTES") {
        shallow_stream_bytes = v;
    }
    Blocking {
        kc,
        ncb,
        ncb_fixed: ncb_env.is_some(),
        mcb,
        stream_bytes,
        shallow_stream_bytes,
    }
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// The blocking of the selected kernel, computed once.
pub(crate) fn blocking_cached(kernel: &'static Kernel) -> Blocking {
    static B: OnceLock<Vec<(usize, Blocking)>> = OnceLock::new();
    let all = B.get_or_init(|| {
        crate::kernels::available()
            .into_iter()
            .map(|k| (k as *const Kernel as usize, blocking(k)))
            .collect()
    });
    all.iter()
        .find(|(p, _)| *p == kernel as *const Kernel as usize)
        .map(|(_, b)| *b)
        .unwrap_or_else(|| blocking(kernel))
}

/// Packing buffers of finished products, shared by every thread: a product
/// takes one, packs into it and returns it. Shared rather than per thread,
/// because the thread that runs a kernel varies from run to run (a per-thread
/// cache made steady-state runs still allocate, whenever a thread packed a
/// size for the first time).
static SPARE: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());

/// At most this many spare buffers are kept (two operands, a few products
/// running at once).
const SPARE_MAX: usize = 8;

/// Buffers larger than this are freed after the call instead of kept.
const KEEP_MAX_FLOATS: usize = 16 << 20;

fn spare() -> std::sync::MutexGuard<'static, Vec<AlignedBuf>> {
    // A panic elsewhere cannot leave the list inconsistent (push/remove only).
    SPARE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of `len` floats (contents unspecified): the smallest spare one
/// that fits, else the largest spare one grown, else a new one.
fn take_buf(len: usize) -> AlignedBuf {
    let mut buf = {
        let mut spare = spare();
        let fit = (0..spare.len())
            .filter(|&i| spare[i].capacity_floats() >= len)
            .min_by_key(|&i| spare[i].capacity_floats())
            .or_else(|| (0..spare.len()).max_by_key(|&i| spare[i].capacity_floats()));
        fit.map(|i| spare.swap_remove(i)).unwrap_or_default()
    };
    buf.reset(len);
    buf
}

/// A packed operand: borrowed (prepacked) or packed now into a spare buffer.
pub(crate) enum Packed<'a> {
    Borrowed(&'a [f32]),
    Owned(AlignedBuf),
}

impl Packed<'_> {
    pub(crate) fn data(&self) -> &[f32] {
        match self {
            Packed::Borrowed(d) => d,
            Packed::Owned(b) => b.as_slice(),
        }
    }
}

impl Drop for Packed<'_> {
    fn drop(&mut self) {
        if let Packed::Owned(buf) = self {
            let buf = std::mem::take(buf);
            if buf.capacity_floats() <= KEEP_MAX_FLOATS {
                let mut spare = spare();
                spare.push(buf);
                if spare.len() > SPARE_MAX {
                    // Drop the smallest: the big ones are the costly ones to remake.
                    if let Some(i) = (0..spare.len()).min_by_key(|&i| spare[i].capacity_floats()) {
                        spare.swap_remove(i);
                    }
                }
            }
        }
    }
}

pub(crate) fn pack_a_now(a: MatRef<'_>, mr: usize) -> Packed<'static> {
    let mut buf = take_buf(a.rows().div_ceil(mr) * mr * a.cols());
    pack::pack_a(a, mr, buf.as_mut_slice());
    Packed::Owned(buf)
}

pub(crate) fn pack_b_now(b: MatRef<'_>, nr: usize) -> Packed<'static> {
    let mut buf = take_buf(b.cols().div_ceil(nr) * nr * b.rows());
    pack::pack_b(b, nr, buf.as_mut_slice());
    Packed::Owned(buf)
}

/// The last, partial `nr`-column panel of a B read in place ([`DirectB`]),
/// packed now; None when B's columns fill whole panels.
pub(crate) fn pack_b_tail_now(b: MatRef<'_>, nr: usize) -> Option<Packed<'static>> {
    let n = b.cols();
    if n % nr == 0 {
        return None;
    }
    let mut buf = take_buf(nr * b.rows());
    pack::pack_b_panel(b, n - n % nr, nr, buf.as_mut_slice());
    Some(Packed::Owned(buf))
}

/// A caller-packed A (`Panels`), filled now into a spare buffer.
pub(crate) fn fill_a_now(a: &crate::Panels<'_>, mr: usize) -> Packed<'static> {
    let mut buf = take_buf(a.rows.div_ceil(mr) * mr * a.cols);
    pack::fill_panels(a.fill, a.rows, a.cols, mr, buf.as_mut_slice());
    Packed::Owned(buf)
}

/// A caller-packed B (`Panels`), filled now into a spare buffer.
pub(crate) fn fill_b_now(b: &crate::Panels<'_>, nr: usize) -> Packed<'static> {
    let mut buf = take_buf(b.cols.div_ceil(nr) * nr * b.rows);
    pack::fill_panels(b.fill, b.cols, b.rows, nr, buf.as_mut_slice());
    Packed::Owned(buf)
}

/// What a gathered A's zero segments read: a k block there reads at most
/// this many floats.
static GATHER_ZEROS: [f32; 1024] = [0.0; 1024];

/// Most segments of a gathered A in one k block (the table of their row
/// pointers lives on the task's stack).
const SEG_BLOCK_MAX: usize = 64;

/// A raw pointer to C that tasks share; each task writes only its own region.
#[derive(Clone, Copy)]
struct CPtr(*mut f32);
// SAFETY: tasks write disjoint regions of C (see `run_task`), and the slice it
// points into outlives the parallel section (it is borrowed by `gemm_packed`).
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

/// The shape and scalars of one product over packed operands.
pub(crate) struct Job<'a> {
    pub kernel: &'static Kernel,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
    /// A packed in `MR`-row panels (empty when `a_rows` is given).
    pub a: &'a [f32],
    /// A row-major A (`m x k`, unit column stride, rows this far apart)
    /// that a kernel which [`Kernel::reads_a_in_place`] reads in place.
    pub a_rows: Option<(&'a [f32], usize)>,
    /// A gathered A that such a kernel reads where its segments lie.
    pub a_gather: Option<crate::Gather<'a>>,
    /// B packed in `NR`-column panels (empty when `b_direct` is given).
    pub b: &'a [f32],
    /// B read in place instead (see [`DirectB`]).
    pub b_direct: Option<DirectB<'a>>,
    pub ldc: usize,
    /// Done by the microkernel on each tile's last k block.
    pub finish: &'a Finish<'a>,
    pub epilogue: Option<&'a Epilogue<'a>>,
}

/// A row-major B (`k x n`, unit column stride) that the microkernel reads in
/// place: every full `NR`-column panel straight from `data` (rows `ld`
/// apart), the last partial one, if any, from `tail` (packed, zero-padded
/// to `NR` columns), since a full-width load there would read past the
/// matrix; or, with an empty `tail` and a kernel that loads only a partial
/// tile's live columns (`Kernel::partial_b_in_place`), in place too.
#[derive(Clone, Copy)]
pub(crate) struct DirectB<'a> {
    pub data: &'a [f32],
    pub ld: usize,
    pub tail: &'a [f32],
}

impl DirectB<'_> {
    /// Whether the partial panel is read in place.
    fn in_place_tail(&self, kern: &Kernel) -> bool {
        self.tail.is_empty() && kern.partial_b_in_place
    }
}

/// `C = alpha * A·B + beta * C` (+ epilogue) over packed A and B, `k >= 1`.
pub(crate) fn gemm_packed(job: &Job<'_>, c: &mut [f32]) {
    let kern = job.kernel;
    let (m, n, k) = (job.m, job.n, job.k);
    debug_assert!(m > 0 && n > 0 && k > 0);
    assert!(c.len() >= (m - 1) * job.ldc + n);
    match (job.a_rows, &job.a_gather) {
        (Some((data, ld)), _) => {
            assert!(kern.reads_a_in_place && ld >= k && data.len() >= (m - 1) * ld + k)
        }
        // `Gather::check` has bounded every segment.
        (None, Some(g)) => {
            assert!(kern.reads_a_in_place && g.rows() == m && g.cols() == k)
        }
        (None, None) => assert!(job.a.len() >= m.div_ceil(kern.mr) * kern.mr * k),
    }
    match &job.b_direct {
        Some(d) => {
            let full = n / kern.nr;
            assert!(full == 0 || d.data.len() >= (k - 1) * d.ld + full * kern.nr);
            assert!(
                d.ld >= n
                    && (n % kern.nr == 0 || d.tail.len() >= k * kern.nr || d.in_place_tail(kern))
            );
            if d.in_place_tail(kern) {
                assert!(d.data.len() >= (k - 1) * d.ld + n);
            }
        }
        None => assert!(job.b.len() >= n.div_ceil(kern.nr) * kern.nr * k),
    }
    let blk = blocking_cached(kern);
    let kc = balanced_kc(blk.kc, k);
    let blk = Blocking {
        kc,
        // The B block keeps its size in bytes: wider for shallower blocks.
        ncb: if blk.ncb_fixed {
            blk.ncb
        } else {
            (blk.ncb * blk.kc / kc).max(1)
        },
        ..blk
    };
    let mp = m.div_ceil(kern.mr);
    let np = n.div_ceil(kern.nr);
    let threads = rayon::current_num_threads().max(1);
    let flops = 2.0 * m as f64 * n as f64 * k as f64;
    let parallel = threads > 1 && flops >= PAR_MIN_FLOPS;

    // Column blocks: as wide as L2 allows, evened out. As few blocks as
    // threads that cannot be even (5 panels in 2) load the threads unevenly,
    // each keeping to its own B block: one block fewer instead, when its
    // blocks stay within half as wide again as L2 allows (392 x 960 x 320
    // on 2 threads: 5 panels in 3 + 2, 0.54-0.66 ms; in one block, 0.49).
    let mut nb = np.div_ceil(blk.ncb.min(np));
    if (2..=threads).contains(&nb)
        && !np.is_multiple_of(nb)
        && np.div_ceil(nb - 1) * 2 <= blk.ncb * 3
    {
        nb -= 1;
    }
    // Row blocks: at most mcb panels, and enough tasks to balance the threads.
    let mut mb = mp.div_ceil(blk.mcb.min(mp));
    if parallel {
        // Too few tasks: cut more. Cutting rows makes every row block read
        // its B blocks again, cutting columns re-reads A: cut first where
        // the operand read again is the smaller one. (With M = 128 and
        // K x N = 3072 x 768 weights streaming from memory, cutting rows
        // first read the 9 MiB of B three times: 300 against 390 GFLOP/s.)
        // Four tasks per thread, up to eight for big products: finer tasks
        // even out the threads' finishing times (128 x 256 x 3136: 0.525 ->
        // 0.487 ms; 2048 x 512 x 49: 0.31 -> 0.255), but on small ones
        // (49 x 960 x 160: 0.038 -> 0.053) cost more than they balance.
        let want = ((flops / TASK_FLOPS) as usize).clamp(4 * threads, 8 * threads);
        let more_rows = |nb: usize, mb: usize| mb.max(want.div_ceil(nb)).min(mp);
        let more_cols = |nb: usize, mb: usize| nb.max(want.div_ceil(mb)).min(np);
        if n <= m {
            if nb * mb < want {
                mb = more_rows(nb, mb);
            }
            if nb * mb < want {
                nb = more_cols(nb, mb);
            }
        } else {
            if nb * mb < want {
                nb = more_cols(nb, mb);
            }
            if nb * mb < want {
                mb = more_rows(nb, mb);
            }
        }
    }
    let (mut nb, mut mb) = (nb.clamp(1, np), mb.clamp(1, mp));
    // A few column panels in uneven blocks (9 in 4: 3, 2, 2, 2) leave one
    // thread a block more at the end: one panel per block instead, with
    // rows cut as before, so every task is the same size. (MobileNetV2's
    // 14x14 196 x 96 x 576 expansions; alternating A/B on 2 threads:
    // MobileNetV2 b1 0.976, b8 0.979, ResNet-50 b1 0.987, BERT-base and
    // YOLOv8n unchanged.)
    if parallel && nb > 1 && !np.is_multiple_of(nb) && np <= 16 && mb > 1 {
        nb = np;
    }
    // Few equal tasks that the threads cannot share evenly (17 on 2: one
    // thread does 9 while the other waits after 8): cut the rows into a few
    // more blocks so they can, when that adds fewer tasks than threads. (ResNet-50's 56x56 1x1 convs as position
    // rows, 3136 x 576 x 64 and 3136 x 64 x 256 on 2 threads: 17 -> 18
    // tasks, 405 -> 450 and 307 -> 390 GFLOP/s.)
    let tasks = nb * mb;
    if parallel && tasks < 16 * threads && !tasks.is_multiple_of(threads) {
        let even = (mb..=mp).find(|&r| (nb * r).is_multiple_of(threads));
        if let Some(r) = even.filter(|&r| (r - mb) * nb < threads) {
            mb = r;
        }
    }
    // Streaming stores skip the cache, so only an output the general
    // epilogue does not read back right away streams; and only on a kernel
    // that has them (no finish to build per tile, no fence, elsewhere).
    let stream = kern.streams
        && job.epilogue.is_none()
        && (job.finish.stream || {
            let c_bytes = m * n * std::mem::size_of::<f32>();
            c_bytes >= blk.stream_bytes || (k <= SHALLOW_K && c_bytes >= blk.shallow_stream_bytes)
        });
    let cp = CPtr(c.as_mut_ptr());
    // Column-block-major order: rayon hands each thread a contiguous range of
    // tasks, so consecutive tasks of a thread share the same B block.
    // Blocks differ by at most one panel: 13 column panels in 4 blocks as
    // 4, 3, 3, 3 rather than 4, 4, 4, 1, whose short tasks left one thread
    // idle at the end (ResNet-50's 128 -> 512 1x1 on 28x28, 512 x 128 x
    // 784: 0.274 -> 0.22 ms on 2 threads).
    let task = |t: usize| {
        let (jb, ib) = (t / mb, t % mb);
        let (p0, p1) = (ib * mp / mb, (ib + 1) * mp / mb);
        let (q0, q1) = (jb * np / nb, (jb + 1) * np / nb);
        // SAFETY: the task grid partitions C's tiles: task t owns rows
        // [p0*MR, min(p1*MR, m)) x columns [q0*NR, min(q1*NR, n)), and no other
        // task touches them; `c` is long enough (asserted above).
        unsafe { run_task(job, &blk, cp, p0, p1, q0, q1, stream) };
    };
    let tasks = nb * mb;
    if parallel {
        (0..tasks).into_par_iter().with_max_len(1).for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// The k block for a product of depth `k`: at most `max`, with the blocks
/// as even as multiples of 8 allow (3072 in three blocks of 1024; 1100 in
/// two of 552 rather than 1024 and 76, whose short block pays a whole C
/// store and reload for little work).
pub(crate) fn balanced_kc(max: usize, k: usize) -> usize {
    let (max, k) = (max.max(1), k.max(1));
    let blocks = k.div_ceil(max).max(1);
    k.div_ceil(blocks).next_multiple_of(8).min(max)
}

/// One task: A panels `p0..p1` against B panels `q0..q1`, all of k; the
/// last k block's tiles stored with streaming stores when `stream`.
///
/// # Safety
/// No other thread may access this task's region of C while it runs, and
/// `cp` must point to a C of at least `(m-1)*ldc + n` floats.
#[allow(clippy::too_many_arguments)]
unsafe fn run_task(
    job: &Job<'_>,
    blk: &Blocking,
    cp: CPtr,
    p0: usize,
    p1: usize,
    q0: usize,
    q1: usize,
    stream: bool,
) {
    let kern = job.kernel;
    let (mr, nr, k) = (kern.mr, kern.nr, job.k);
    let (m, n, ldc) = (job.m, job.n, job.ldc);
    let c = cp.0;
    let fin = job.finish;
    let col0 = q0 * nr;
    let width = (q1 * nr).min(n) - col0;
    // A gathered A's segments shorter than a k block are read a block of
    // whole segments at a time, through a table of row pointers per
    // segment (`TileA::Segments`); longer ones a k block within one
    // segment at a time (`TileA::Rows`).
    let seg_block = job
        .a_gather
        .as_ref()
        .filter(|g| g.seg_len <= GATHER_ZEROS.len())
        .map(|g| blk.kc / g.seg_len.max(1))
        .filter(|&s| s >= 2)
        .map(|s| s.min(SEG_BLOCK_MAX));
    // Only a gather in whole segments needs the table: every other product's
    // tasks skip zeroing its 4 KiB.
    let mut seg_ptrs = seg_block.map(|_| [std::ptr::null::<f32>(); SEG_BLOCK_MAX * MAX_MR]);
    let mut pc = 0;
    while pc < k {
        let mut kc = blk.kc.min(k - pc);
        if let Some(g) = &job.a_gather {
            kc = match seg_block {
                // Whole segments (pc is at a segment's start, k a multiple
                // of seg_len).
                Some(s) => (s * g.seg_len).min(k - pc),
                // A k block reads within one segment of each row.
                None => kc.min(g.seg_len - pc % g.seg_len).min(GATHER_ZEROS.len()),
            };
        }
        let beta = if pc == 0 { job.beta } else { 1.0 };
        let last = pc + kc == k;
        for ip in p0..p1 {
            let rows = mr.min(m - ip * mr);
            // Row i's segment t, from float q of it.
            let seg_at = |g: &crate::Gather<'_>, i: usize, t: usize, q: usize| match g.segment(i, t)
            {
                None => GATHER_ZEROS.as_ptr(),
                Some(o) => g.data[o + q..].as_ptr(),
            };
            let a = match (job.a_rows, &job.a_gather) {
                (Some((data, ld)), _) => TileA::Rows(std::array::from_fn(|r| {
                    if r < rows {
                        data[(ip * mr + r) * ld + pc..].as_ptr()
                    } else {
                        std::ptr::null()
                    }
                })),
                (None, Some(g)) => match seg_ptrs.as_mut() {
                    // Whole segments, through the block's table.
                    Some(table) => {
                        let t0 = pc / g.seg_len;
                        // Row by row: one division per row, not per segment
                        // (with YOLOv8n's 32-channel segments, dividing per
                        // segment cost a tenth of its 3x3 convs' time).
                        for r in 0..rows {
                            let (offsets, base) = g.row(ip * mr + r);
                            let segs = &offsets[t0..t0 + kc / g.seg_len];
                            for (s, &o) in segs.iter().enumerate() {
                                table[s * MAX_MR + r] = match o {
                                    crate::GATHER_ZEROS => GATHER_ZEROS.as_ptr(),
                                    o => g.data[o + base..].as_ptr(),
                                };
                            }
                        }
                        TileA::Segments {
                            ptrs: table.as_ptr(),
                            seg_len: g.seg_len,
                        }
                    }
                    // Within one segment of each row.
                    None => {
                        let (t, q) = (pc / g.seg_len, pc % g.seg_len);
                        TileA::Rows(std::array::from_fn(|r| {
                            if r < rows {
                                seg_at(g, ip * mr + r, t, q)
                            } else {
                                std::ptr::null()
                            }
                        }))
                    }
                },
                (None, None) => TileA::Packed(job.a[ip * mr * k + pc * mr..].as_ptr()),
            };
            for jq in q0..q1 {
                let cols = nr.min(n - jq * nr);
                let (b, ldb) = match &job.b_direct {
                    Some(d) if cols == nr || d.in_place_tail(kern) => {
                        (d.data[pc * d.ld + jq * nr..].as_ptr(), d.ld)
                    }
                    Some(d) => (d.tail[pc * nr..].as_ptr(), nr),
                    None => (job.b[jq * nr * k + pc * nr..].as_ptr(), nr),
                };
                let (i0, j0) = (ip * mr, jq * nr);
                // The finish's slices cover all of C (checked by `Finish::check`),
                // so these offsets start the tile's rows / columns in bounds.
                let tile_fin = (last && (stream || !fin.is_none())).then(|| TileFinish {
                    row_bias: fin.row_bias.map_or(std::ptr::null(), |b| b[i0..].as_ptr()),
                    col_bias: fin.col_bias.map_or(std::ptr::null(), |b| b[j0..].as_ptr()),
                    res: fin
                        .residual
                        .map_or(std::ptr::null(), |r| r.data[i0 * r.ld + j0..].as_ptr()),
                    ldr: fin.residual.map_or(0, |r| r.ld),
                    clamp: fin.clamp,
                    stream,
                });
                // SAFETY: A panel ip holds mr*k floats from ip*mr*k, so kc*mr
                // remain from pc*mr (A read in place: its rows ip*mr.. hold
                // k floats each, ld apart, asserted in `gemm_packed`, so kc
                // remain from column pc of each; gathered: each row's
                // segment holds seg_len floats inside `data` (checked by
                // `Gather::check`), kc of them from pc's place in it, and
                // the zero segment at least kc; in whole segments, `seg_ptrs`
                // holds each of the block's segments' row pointers, every
                // one to seg_len readable floats); likewise a packed B panel. A direct B's
                // full panel has kc rows of nr floats from row pc, ld apart
                // (asserted in `gemm_packed`); its tail panel is packed, or
                // read in place by a kernel that loads only the live
                // columns (then B holds all of them, asserted too). The tile starting at row i0,
                // column j0 with `rows x cols` is inside C and inside this
                // task's region (caller's contract), and the finish pointers
                // cover the same rows and columns of their m x n operands.
                unsafe {
                    kern.micro(
                        kc,
                        a,
                        b,
                        ldb,
                        c.add(i0 * ldc + j0),
                        ldc,
                        job.alpha,
                        beta,
                        rows,
                        cols,
                        tile_fin.as_ref(),
                    )
                };
            }
            if let (true, Some(epi)) = (last, job.epilogue) {
                for i in ip * mr..ip * mr + rows {
                    // SAFETY: row i, columns [col0, col0 + width) are this
                    // task's, and in bounds of C; no other reference to them
                    // exists during the call.
                    let seg =
                        unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc + col0), width) };
                    epi(i, col0, seg);
                }
            }
        }
        pc += kc;
    }
    if stream {
        // Streaming stores are weakly ordered: make them visible before the
        // task reports done and another thread reads C.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: sfence has no memory operands; SSE is baseline on x86_64.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
    }
}
