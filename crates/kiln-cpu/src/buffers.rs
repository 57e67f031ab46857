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
//!   at batch 1 has 12.5 MB of outputs from 4 KiB to 1 MiB a run; pooled, it runs 3-5%
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
/// Most bytes, and most buffers, the small tier keeps idle (the oldest go).
const MAX_SMALL_BYTES: usize = 16 << 20;
const MAX_SMALL_BUFS: usize = 256;

/// One tier's idle buffers, oldest first, and their bytes (capacities).
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
        let b = self.bufs.remove(i);
        self.bytes -= b.capacity() * 4;
        b
    }

    /// Big tier: the smallest buffer that holds `n` without wasting over a
    /// third of it.
    fn take_big(&mut self, n: usize) -> Option<Vec<f32>> {
        let best = self
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= n && b.capacity() - n <= b.capacity() / 3)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        best.map(|i| self.remove(i))
    }

    /// Small tier: the smallest buffer that holds `n` within twice its size
    /// (repeated shapes get their own buffers back), the most recently given
    /// back among equals (`min_by_key` keeps the first minimum it meets).
    fn take_small(&mut self, n: usize) -> Option<Vec<f32>> {
        let best = self
            .bufs
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, b)| b.capacity() >= n && b.capacity() <= n.saturating_mul(2))
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        best.map(|i| self.remove(i))
    }

    /// Big tier: keeps `v` if it fits under the byte limit, else hands it
    /// back (to be freed).
    fn put_big(&mut self, v: Vec<f32>) -> Option<Vec<f32>> {
        let bytes = v.capacity() * 4;
        if self.bytes + bytes > MAX_POOL_BYTES {
            return Some(v);
        }
        self.bytes += bytes;
        self.bufs.push(v);
        None
    }

    /// Small tier: keeps `v` as the newest buffer, handing back the oldest
    /// ones (to be freed) until the tier is within its limits.
    fn put_small(&mut self, v: Vec<f32>) -> Vec<Vec<f32>> {
        let bytes = v.capacity() * 4;
        let mut evicted = Vec::new();
        while !self.bufs.is_empty()
            && (self.bufs.len() >= MAX_SMALL_BUFS || self.bytes + bytes > MAX_SMALL_BYTES)
        {
            evicted.push(self.remove(0));
        }
        self.bytes += bytes;
        self.bufs.push(v);
        evicted
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
/// earlier use, or zeros; NaN in this crate's unit tests): the caller must
/// overwrite every element.
pub fn take_f32(n: usize) -> Vec<f32> {
    let bytes = n.saturating_mul(4);
    let found = if bytes >= MIN_BYTES {
        pool().big.take_big(n)
    } else if bytes >= SMALL_MIN_BYTES {
        pool().small.take_small(n)
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

/// Gives a buffer back for reuse: under [`SMALL_MIN_BYTES`] it is freed, a
/// big one too when its tier is full, a small one makes its tier free its
/// oldest buffers when full. (Buffers are freed outside the lock.)
pub fn recycle(v: Vec<f32>) {
    let bytes = v.capacity() * 4;
    if bytes < SMALL_MIN_BYTES {
        return;
    }
    if bytes >= MIN_BYTES {
        let rejected = pool().big.put_big(v);
        drop(rejected);
    } else {
        let evicted = pool().small.put_small(v);
        drop(evicted);
    }
}

/// [`recycle`] for a tensor's f32 storage; other dtypes are just dropped.
pub fn recycle_tensor(t: Tensor) {
    if let TensorData::F32(v) = t.into_data() {
        recycle(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(n: usize) -> Vec<f32> {
        vec![1.0; n]
    }

    // On a tier of its own: the global pool is shared with every other
    // test running meanwhile.
    #[test]
    fn big_tier_gives_the_smallest_fit_and_keeps_to_its_bytes() {
        let n = MIN_BYTES / 4 + 12_347;
        let mut t = Tier::new();
        let (a, b) = (buf(n), buf(2 * n));
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        assert!(t.put_big(b).is_none() && t.put_big(a).is_none());
        assert_eq!(t.bytes, 3 * n * 4);
        // A slightly smaller request takes the smaller buffer.
        let got = t.take_big(n - 100).expect("a fit");
        assert_eq!(got.as_ptr(), pa);
        assert_eq!(t.bytes, 2 * n * 4);
        // Half of the bigger one would be wasted: no fit.
        assert!(t.take_big(n).is_none());
        assert_eq!(t.take_big(2 * n - 5).map(|v| v.as_ptr()), Some(pb));
        assert_eq!((t.bufs.len(), t.bytes), (0, 0));
        // Past the byte limit a buffer is handed back.
        let mut full = Tier::new();
        full.bytes = MAX_POOL_BYTES - 4;
        assert!(full.put_big(buf(n)).is_some());
        assert_eq!(full.bytes, MAX_POOL_BYTES - 4);
    }

    #[test]
    fn small_tier_gives_the_most_recent_of_equal_fits() {
        let n = 3 * 1021; // 12 KiB
        let mut t = Tier::new();
        let (a, b, big) = (buf(n), buf(n), buf(3 * n));
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        assert!(t.put_small(a).is_empty());
        assert!(t.put_small(big).is_empty());
        assert!(t.put_small(b).is_empty());
        assert_eq!(t.bytes, 5 * n * 4);
        // b, the most recent of the two that fit, then a.
        assert_eq!(t.take_small(n - 7).map(|v| v.as_ptr()), Some(pb));
        assert_eq!(t.take_small(n).map(|v| v.as_ptr()), Some(pa));
        // The 3n buffer is more than twice n: not handed out for it.
        assert!(t.take_small(n).is_none());
        assert!(t.take_small(2 * n).is_some());
        assert_eq!((t.bufs.len(), t.bytes), (0, 0));
    }

    #[test]
    fn small_tier_evicts_its_oldest_buffers() {
        let mut t = Tier::new();
        let first = buf(2048);
        let p_first = first.as_ptr();
        assert!(t.put_small(first).is_empty());
        for _ in 1..MAX_SMALL_BUFS {
            assert!(t.put_small(buf(2048)).is_empty());
        }
        assert_eq!(t.bufs.len(), MAX_SMALL_BUFS);
        // One more: the oldest goes.
        let evicted = t.put_small(buf(2048));
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].as_ptr(), p_first);
        assert_eq!(
            (t.bufs.len(), t.bytes),
            (MAX_SMALL_BUFS, MAX_SMALL_BUFS * 2048 * 4)
        );
        // Bytes: a buffer that needs room for itself pushes out as many as
        // it takes.
        let mut t = Tier::new();
        let quarter = MAX_SMALL_BYTES / 4 / 4; // floats
        for _ in 0..4 {
            assert!(t.put_small(buf(quarter)).is_empty());
        }
        assert_eq!(t.bytes, MAX_SMALL_BYTES);
        let evicted = t.put_small(buf(2 * quarter));
        assert_eq!(evicted.len(), 2);
        assert_eq!(t.bytes, MAX_SMALL_BYTES);
    }

    // Through the global functions: the right length, whatever the pool
    // holds, and NaN (this crate's tests) so unwritten output shows.
    #[test]
    fn taken_buffers_have_the_asked_length() {
        for n in [0, 100, 3 * 1021, MIN_BYTES / 4 + 12_347] {
            let v = take_f32(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|x| x.is_nan()));
            recycle(v);
            let again = take_f32(n.saturating_sub(3));
            assert_eq!(again.len(), n.saturating_sub(3));
        }
        recycle_tensor(Tensor::from_vec(vec![2], vec![1i64, 2]).unwrap());
    }
}
