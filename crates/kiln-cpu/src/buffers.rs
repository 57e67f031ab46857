//! Reuse of f32 output buffers from one op (and one run) to the next.
//!
//! glibc serves every allocation above its mmap threshold (32 MiB at most)
//! with a fresh mapping and unmaps it on free, so an op whose output is that
//! big pays a page fault for every 4 KiB it writes, on every run: a 1x1 conv
//! of MobileNetV2 at batch 8 (a 38 MiB output) took 14 ms instead of 3.4.
//! The runtime hands the tensors it frees to [`recycle`]; the kernels that
//! write their whole output take their buffer with [`take_f32`].
//!
//! Two tiers:
//! - big buffers (from [`MIN_BYTES`]): the smallest that fits, to keep the
//!   pool's footprint down;
//! - small ones (from [`SMALL_MIN_BYTES`]): the smallest that holds the
//!   request within twice its size, the most recently given back among
//!   equals. Taken from malloc instead, every small output came zeroed: a
//!   memset on the calling thread before the kernel's parallel part, on
//!   lines the other worker then pulled over from that core. MobileNetV2
//!   at batch 1 zeroed about 8 MB a run this way; pooled, it runs 3-5%
//!   faster on 2 threads (1% on 1), and its peak RSS grows from 41 to 55
//!   MiB (the tier's idle buffers, at most [`MAX_SMALL_BYTES`]).
//!
//! Buffers under [`SMALL_MIN_BYTES`] are left to malloc.
use kiln_ir::{Tensor, TensorData};
use std::sync::Mutex;

/// Smallest buffer of the big tier.
pub const MIN_BYTES: usize = 1 << 20;
/// Most bytes the big tier keeps idle; a buffer that does not fit is freed.
const MAX_POOL_BYTES: usize = 128 << 20;
/// Smallest buffer of the small tier.
pub const SMALL_MIN_BYTES: usize = 4 << 10;
/// Most bytes, and most buffers, the small tier keeps idle.
const MAX_SMALL_BYTES: usize = 16 << 20;
const MAX_SMALL_BUFS: usize = 256;

/// One tier's idle buffers and their bytes (capacities).
struct Tier {
    bufs: Vec<Vec<f32>>,
    bytes: usize,
}

impl Tier {
    const fn new() -> Tier {
        Tier {
            bufs: Vec::new(),
            bytes: 0,
        }
    }

    fn remove(&mut self, i: usize) -> Vec<f32> {
        // Order matters only in the small tier (most recent last).
        let b = self.bufs.remove(i);
        self.bytes -= b.capacity() * 4;
        b
    }
}

struct Pool {
    big: Tier,
    small: Tier,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    big: Tier::new(),
    small: Tier::new(),
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // A panic while holding the lock leaves a consistent Vec: keep using it.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of `n` f32s whose contents are unspecified (stale values from an
/// earlier use, or zeros): the caller must overwrite every element.
pub fn take_f32(n: usize) -> Vec<f32> {
    let bytes = n.saturating_mul(4);
    let found = if bytes >= MIN_BYTES {
        let mut p = pool();
        // The smallest buffer that holds n without wasting over a third.
        let best = p
            .big
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= n && b.capacity() - n <= b.capacity() / 3)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        best.map(|i| p.big.remove(i))
    } else if bytes >= SMALL_MIN_BYTES {
        let mut p = pool();
        // The smallest that holds n within twice its size (repeated shapes
        // get their own buffers back), the most recent among equals.
        let recent = p
            .small
            .bufs
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, b)| b.capacity() >= n && b.capacity() <= n.saturating_mul(2))
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        recent.map(|i| p.small.remove(i))
    } else {
        None
    };
    let mut b = match found {
        Some(mut b) => {
            if b.len() >= n {
                b.truncate(n);
            } else {
                b.resize(n, 0.0);
            }
            b
        }
        None => vec![0.0; n],
    };
    // In the unit tests every buffer comes back as NaN, so a kernel that
    // leaves part of its output unwritten fails against its reference
    // whatever state the pool is in.
    if cfg!(test) {
        b.fill(f32::NAN);
    }
    b
}

/// Gives a buffer back for reuse (or frees it when small or its tier is full).
pub fn recycle(v: Vec<f32>) {
    let bytes = v.capacity() * 4;
    if bytes < SMALL_MIN_BYTES {
        return;
    }
    let mut p = pool();
    if bytes >= MIN_BYTES {
        if p.big.bytes + bytes <= MAX_POOL_BYTES {
            p.big.bytes += bytes;
            p.big.bufs.push(v);
        }
        return;
    }
    // Room for the newest buffer: the oldest go (freed outside the lock).
    let small = &mut p.small;
    let mut evicted = Vec::new();
    while !small.bufs.is_empty()
        && (small.bufs.len() >= MAX_SMALL_BUFS || small.bytes + bytes > MAX_SMALL_BYTES)
    {
        evicted.push(small.remove(0));
    }
    small.bytes += bytes;
    small.bufs.push(v);
    drop(p);
    drop(evicted);
}

/// [`recycle`] for a tensor's f32 storage; other dtypes are just dropped.
pub fn recycle_tensor(t: Tensor) {
    if let TensorData::F32(v) = t.into_data() {
        recycle(v);
    }
}

/// Bytes held idle in the pool's big and small tiers (for tests and
/// diagnostics).
pub fn pooled_bytes() -> (usize, usize) {
    let p = pool();
    (p.big.bytes, p.small.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The pool is global: an odd size keeps other tests' requests off it.
    #[test]
    fn big_buffers_come_back_and_small_ones_do_not() {
        let n = MIN_BYTES + 12_347; // over 4 MiB of f32
        let mut a = take_f32(n);
        assert_eq!(a.len(), n);
        a.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
        let ptr = a.as_ptr();
        let before = pooled_bytes().0;
        recycle(a);
        assert_eq!(pooled_bytes().0, before + n * 4);
        // A slightly smaller request reuses it: same memory, right length.
        let b = take_f32(n - 100);
        assert_eq!(b.len(), n - 100);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(pooled_bytes().0, before);
        // Far smaller requests do not take a buffer that would waste most of it.
        recycle(b);
        let c = take_f32(n / 2);
        assert_ne!(c.as_ptr(), ptr);
        assert!(c.iter().all(|v| v.is_nan()), "unit tests get NaN buffers");
        // Growing within capacity keeps the memory.
        let d = take_f32(n);
        assert_eq!(d.as_ptr(), ptr);
        assert_eq!(d.len(), n);
        // Small buffers are not pooled.
        let before = pooled_bytes().0;
        recycle(vec![0.0; 16]);
        recycle_tensor(Tensor::from_vec(vec![2], vec![1i64, 2]).unwrap());
        assert_eq!(pooled_bytes().0, before);
        recycle_tensor(Tensor::from_vec(vec![n], d).unwrap());
        assert_eq!(pooled_bytes().0, before + n * 4);
        drop(c);
    }

    // The small tier hands back the most recent of equal buffers that fit,
    // and keeps their stale contents (no zeroing). Odd sizes keep other tests'
    // buffers (the pool is global) out of the way.
    #[test]
    fn small_buffers_come_back_most_recent_first() {
        let n = 3 * 1021; // 12 KiB
        let a = take_f32(n);
        let b = take_f32(n);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        recycle(a);
        recycle(b);
        let c = take_f32(n - 7);
        assert_eq!(c.as_ptr(), pb, "the most recent buffer first");
        let d = take_f32(n);
        assert_eq!(d.as_ptr(), pa);
        // Far smaller requests do not take a buffer that would waste much.
        recycle(d);
        let e = take_f32(n / 3);
        assert_ne!(e.as_ptr(), pa);
        drop((c, e));
    }
}
