//! A global allocator that starts every large block on a cache line.
//!
//! The GEMM stores outputs bigger than the last-level cache with streaming
//! (non-temporal) stores, which skip the read of each line a normal store
//! makes first; those need 64-byte-aligned rows. glibc hands out large
//! blocks 16 bytes past a page start, so without this no row of such an
//! output is aligned and the GEMM stores them the usual way. (MobileNetV2 at
//! batch 8: its 16 -> 96 1x1 conv writes a 38 MiB output; streamed, it takes
//! 1.4 ms instead of 2.4.)
//!
//! Programs that run kiln install it once (the `kiln` binary does):
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: kiln_runtime::LargeAligned = kiln_runtime::LargeAligned;
//! ```
//!
//! Without it kiln computes the same values; big outputs are just stored
//! the usual way.
//!
//! A large block is a plain malloc/calloc of 64 more bytes, moved up to the
//! next line with the original pointer kept just below it. Asking glibc for
//! the alignment instead (posix_memalign) changed how it reuses and returns
//! memory: ResNet-50 at batch 8 took 4,700 more page faults per run and
//! 5-20% longer. This way glibc sees the same requests as without it, and
//! calloc still skips clearing pages that are fresh from the system.
//!
//! Blocks of 32 MiB and more also ask for transparent huge pages
//! ([`HUGE_BYTES`]): glibc maps each fresh, and a fault per 4 KiB page on
//! first write cost GPT-2's LM head at batch 8 a third of its time.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of at least this many bytes start on a cache line: the big
/// activation buffers kiln pools and reuses (`kiln_cpu::buffers`), and the
/// smaller ones that kernels read a vector (64 bytes) at a time: from a
/// block 16 bytes past a line, every such load spans two lines (MobileNetV2
/// at batch 1, whose 14x14 and 28x28 activations are 50-600 KiB: its
/// channels-last depthwise convs 10-25% faster aligned, the model 1.4%).
pub const LARGE_BYTES: usize = 4 << 10;
/// A cache line.
const LINE: usize = 64;
/// Room for the original pointer below a moved block: malloc's blocks are
/// 16-byte aligned, so a block moved up to the next line (past at least
/// this many bytes) always has it.
const HEADER: usize = 16;

/// [`System`], with blocks of [`LARGE_BYTES`] or more aligned to 64 bytes.
pub struct LargeAligned;

/// Whether a block of this layout is moved to a line.
fn large(layout: Layout) -> bool {
    layout.size() >= LARGE_BYTES && layout.align() <= HEADER
}

/// The request that backs a large block of `size` bytes.
fn backing(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(LINE)?, HEADER).ok()
}

/// Bytes from a backing block's start to its line-aligned block: in
/// [HEADER, LINE], as the backing block is 16-byte aligned.
fn skip(raw: *mut u8) -> usize {
    LINE - raw as usize % LINE
}

/// Records `raw` just below `block` (which is `raw + skip(raw)`).
///
/// # Safety
/// `raw` is a block of `backing(size)` and `block` is `raw + skip(raw)`.
unsafe fn mark(raw: *mut u8, block: *mut u8) {
    // SAFETY: skip(raw) >= HEADER, so the 8 bytes below the block are
    // inside the backing block, and 8-byte aligned.
    unsafe { (block as *mut *mut u8).sub(1).write(raw) }
}

/// `backing(size)` of a large block that was allocated, so exists.
///
/// # Safety
/// A block of `size` bytes came from `from_system`.
unsafe fn backing_of(size: usize) -> Layout {
    // SAFETY: backing(size) succeeded when the block was allocated.
    unsafe { Layout::from_size_align_unchecked(size + LINE, HEADER) }
}

/// The line-aligned block inside `raw` (a `backing` block), marked; null
/// stays null.
///
/// # Safety
/// `raw` is null or a block of `backing(size)` for the block's size.
unsafe fn place(raw: *mut u8) -> *mut u8 {
    if raw.is_null() {
        return raw;
    }
    // SAFETY: skip(raw) <= LINE, so the block's size bytes fit in the
    // backing block's size + LINE.
    unsafe {
        let block = raw.add(skip(raw));
        mark(raw, block);
        block
    }
}

/// The backing block of a large block that `place` returned.
///
/// # Safety
/// `block` came from `place`.
unsafe fn raw_of(block: *mut u8) -> *mut u8 {
    // SAFETY: place wrote the backing pointer just below the block.
    unsafe { (block as *mut *mut u8).sub(1).read() }
}

/// A block of `layout` from `get` (System's alloc or alloc_zeroed): as it
/// comes when small; when large, placed on a line inside a backing block.
///
/// # Safety
/// `layout` has a non-zero size, and `get` returns null or a block of the
/// layout it is given.
unsafe fn from_system(layout: Layout, get: impl FnOnce(Layout) -> *mut u8) -> *mut u8 {
    if !large(layout) {
        return get(layout);
    }
    match backing(layout.size()) {
        // SAFETY: place gets null or a block of backing(size).
        Some(b) => {
            let block = unsafe { place(get(b)) };
            if layout.size() >= HUGE_BYTES && !block.is_null() {
                advise_huge(block, layout.size());
            }
            block
        }
        None => std::ptr::null_mut(),
    }
}

/// Blocks of at least this many bytes ask for transparent huge pages: glibc
/// maps them fresh from the system on every allocation (its mmap threshold
/// is at most 32 MiB), and each 4 KiB page of such a block then cost a
/// fault on first write. GPT-2's LM head at batch 8 writes a 206 MB output
/// (too big for `kiln_cpu::buffers`' pool): 50,000 faults a run.
const HUGE_BYTES: usize = 32 << 20;

/// Asks the kernel to back the whole 2 MiB pages inside `[block, block +
/// size)` with huge pages (Linux `madvise(MADV_HUGEPAGE)`; a hint, ignored
/// where transparent huge pages are off).
fn advise_huge(block: *mut u8, size: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (block as usize).next_multiple_of(HUGE);
        let end = (block as usize + size) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside a block this process owns;
            // madvise with MADV_HUGEPAGE changes no contents, only how the
            // kernel backs the pages, and its failure is harmless.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (block, size);
}

// SAFETY: small blocks go to System unchanged. A large block lies inside a
// System block of `backing(size)` (16-byte aligned), starts on a 64-byte line
// and has its `size` bytes there (`place`), so it satisfies any alignment up
// to 16 that `large` admits; dealloc and realloc find the System block from
// the pointer stored below it, and `large` gives the same answer for the
// layout the caller passes back.
unsafe impl GlobalAlloc for LargeAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract (a non-zero layout).
        unsafe { from_system(layout, |l| System.alloc(l)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract; the whole backing block is zeroed, so
        // is the part `place` hands out.
        unsafe { from_system(layout, |l| System.alloc_zeroed(l)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from alloc with this layout: a System block, or
        // for a large one, a block `place` made in one of backing(size).
        unsafe {
            if large(layout) {
                System.dealloc(raw_of(ptr), backing_of(layout.size()));
            } else {
                System.dealloc(ptr, layout);
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY (layout): the caller guarantees new_size is valid with the
        // caller's alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (large(layout), large(new_layout)) {
            // SAFETY: forwarded contract.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) => {
                let Some(new_b) = backing(new_size) else {
                    return std::ptr::null_mut();
                };
                // SAFETY: ptr is a placed block in System's block `raw` of
                // backing(old size); System.realloc keeps its bytes up to
                // the smaller size. The block's offset in the new backing
                // block may differ from the old one, so its bytes are moved
                // to where place puts them (ranges may overlap: copy).
                unsafe {
                    let raw = raw_of(ptr);
                    let offset = ptr as usize - raw as usize;
                    let new_raw = System.realloc(raw, backing_of(layout.size()), new_b.size());
                    if new_raw.is_null() {
                        return new_raw;
                    }
                    // The bytes first: the new mark may lie inside them.
                    let block = new_raw.add(skip(new_raw));
                    if skip(new_raw) != offset {
                        std::ptr::copy(new_raw.add(offset), block, layout.size().min(new_size));
                    }
                    mark(new_raw, block);
                    block
                }
            }
            // Crossing LARGE_BYTES: a fresh block, the bytes, then the old
            // one freed.
            _ => {
                // SAFETY: new_layout has a non-zero size (caller's
                // contract); both blocks hold min(old, new) bytes and are
                // distinct; ptr is freed with the layout it came with.
                unsafe {
                    let block = self.alloc(new_layout);
                    if !block.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, block, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    block
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 4).unwrap()
    }

    #[test]
    fn large_blocks_are_line_aligned_small_ones_untouched() {
        let a = LargeAligned;
        // (40 MiB: a block advised to take huge pages.)
        for size in [LARGE_BYTES, LARGE_BYTES + 4, 3 << 20, HUGE_BYTES, 40 << 20] {
            // SAFETY: non-zero layouts; each block is freed with its layout.
            unsafe {
                let p = a.alloc(layout(size));
                assert!(!p.is_null());
                assert_eq!(p as usize % LINE, 0, "{size} bytes");
                p.write_bytes(7, size);
                let z = a.alloc_zeroed(layout(size));
                assert_eq!(z as usize % LINE, 0);
                assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                a.dealloc(z, layout(size));
                assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 7));
                a.dealloc(p, layout(size));
            }
        }
        // Alignments above 16 are left to System.
        let big = Layout::from_size_align(LARGE_BYTES, 4096).unwrap();
        // SAFETY: freed with its layout.
        unsafe {
            let p = a.alloc(big);
            assert_eq!(p as usize % 4096, 0);
            a.dealloc(p, big);
        }
    }

    #[test]
    fn realloc_keeps_bytes_and_alignment_across_and_above_the_threshold() {
        let a = LargeAligned;
        let fill = |p: *mut u8, n: usize| {
            // SAFETY: p holds n bytes.
            unsafe { (0..n).for_each(|i| *p.add(i) = (i % 251) as u8) }
        };
        let check = |p: *mut u8, n: usize| {
            // SAFETY: p holds n bytes.
            (0..n).all(|i| unsafe { *p.add(i) } == (i % 251) as u8)
        };
        // SAFETY: each pointer is used with the layout of its current size.
        unsafe {
            let p = a.alloc(layout(1000));
            fill(p, 1000);
            let q = a.realloc(p, layout(1000), 2 * LARGE_BYTES);
            assert_eq!(q as usize % LINE, 0);
            assert!(check(q, 1000));
            fill(q, 2 * LARGE_BYTES);
            // Large to larger, many times: glibc moves or grows the backing
            // block, and the offset below the line changes with it.
            let mut cur = q;
            let mut size = 2 * LARGE_BYTES;
            for step in 1..6 {
                let next = size + step * 12_345;
                cur = a.realloc(cur, layout(size), next);
                assert!(!cur.is_null());
                assert_eq!(cur as usize % LINE, 0);
                assert!(check(cur, size), "grow to {next}");
                fill(cur, next);
                size = next;
            }
            // Shrink while staying large, then below the threshold.
            cur = a.realloc(cur, layout(size), LARGE_BYTES + 3);
            assert_eq!(cur as usize % LINE, 0);
            assert!(check(cur, LARGE_BYTES + 3));
            let s = a.realloc(cur, layout(LARGE_BYTES + 3), 500);
            assert!(check(s, 500));
            a.dealloc(s, layout(500));
        }
    }
}
