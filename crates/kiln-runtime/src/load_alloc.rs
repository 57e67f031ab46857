//! glibc malloc settings around model loading, so that peak memory is the
//! model's, not the allocator's.
//!
//! Loading allocates every weight, then packs most of them into new buffers
//! and frees the originals. glibc's adaptive mmap threshold rises to 32 MiB
//! after the first large free, so most weights land on the heap, whose freed
//! holes the (slightly larger) packed copies do not fit: the heap keeps
//! growing and is never returned. GPT-2-small peaked at 1,003 MiB for 498 MiB
//! of weights. While any session loads, weights are mmapped (threshold
//! 128 KiB) and go back to the OS when freed (780 MiB). Afterwards the
//! threshold is fixed where the adaptive one ends up (32 MiB) with a trim
//! threshold above it, so activations at run time reuse heap memory without
//! a page fault per run, as they did before.
//!
//!
//! The first load also limits malloc to one arena (unless the user set
//! `MALLOC_ARENA_MAX`). Each op runs on whichever compute thread picks it
//! up, and glibc gives every thread its own arena, whose freed blocks only
//! that arena reuses: the same run's buffers were cached twice over, and
//! ResNet-50's peak at batch 8 varied from 372 to 452 MiB between runs (331-338
//! MiB with one arena, MobileNetV2 b8 175 -> 162 MiB; latencies unchanged
//! or lower). Small allocations still go through each thread's tcache
//! without the arena lock.
//!
//! Only on Linux with glibc; elsewhere these are no-ops.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Sessions loading now; the settings change on 0 -> 1 and 1 -> 0.
static LOADING: AtomicUsize = AtomicUsize::new(0);

/// While alive, large allocations are mmapped (see the module docs).
pub(crate) struct LoadAllocs(());

impl LoadAllocs {
    pub(crate) fn begin() -> LoadAllocs {
        static ONE_ARENA: std::sync::Once = std::sync::Once::new();
        ONE_ARENA.call_once(|| {
            if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
                set_one_arena();
            }
        });
        if LOADING.fetch_add(1, Ordering::SeqCst) == 0 {
            set_mmap_threshold(LOAD_MMAP_THRESHOLD);
        }
        LoadAllocs(())
    }
}

impl Drop for LoadAllocs {
    fn drop(&mut self) {
        if LOADING.fetch_sub(1, Ordering::SeqCst) == 1 {
            set_mmap_threshold(RUN_MMAP_THRESHOLD);
        }
    }
}

const LOAD_MMAP_THRESHOLD: usize = 128 << 10;
/// glibc's largest adaptive threshold on 64-bit targets.
const RUN_MMAP_THRESHOLD: usize = 32 << 20;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_mmap_threshold(bytes: usize) {
    let trim = if bytes == RUN_MMAP_THRESHOLD {
        // Keep freed heap memory for the next run rather than returning and
        // faulting it back in (glibc's adaptive trim threshold is twice the
        // mmap threshold).
        2 * bytes
    } else {
        bytes
    };
    // SAFETY: mallopt only changes allocator parameters; it is thread-safe
    // in glibc (it takes the arena locks) and any value is accepted or
    // refused with a return of 0, which needs no handling here: the settings
    // affect memory use, never correctness.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim as libc::c_int);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_mmap_threshold(_bytes: usize) {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_one_arena() {
    // SAFETY: as in `set_mmap_threshold`: a thread-safe parameter change
    // that affects memory use only (threads that already have an arena
    // keep it; new ones share the main arena).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_one_arena() {}
