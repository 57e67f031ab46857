//! Reuse of big f32 output buffers from one op (and one run) to the next.
//!
//! glibc serves every allocation above its mmap threshold (32 MiB at most)
//! with a fresh mapping and unmaps it on free, so an op whose output is that
//! big pays a page fault for every 4 KiB it writes, on every run: a 1x1 conv
//! of MobileNetV2 at batch 8 (a 38 MiB output) took 14 ms instead of 3.4.
//! The runtime hands the tensors it frees to [`recycle`]; the kernels that
//! write big outputs take their buffer with [`take_f32`]. Buffers under
//! [`MIN_BYTES`] are left to malloc, which reuses small blocks well.

use kiln_ir::{Tensor, TensorData};
use std::sync::Mutex;

/// Smallest buffer worth pooling.
pub const MIN_BYTES: usize = 1 << 20;
/// Most bytes the pool keeps idle; a buffer that does not fit is freed.
const MAX_POOL_BYTES: usize = 128 << 20;

struct Pool {
    bufs: Vec<Vec<f32>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    bufs: Vec::new(),
    bytes: 0,
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // A panic while holding the lock leaves a consistent Vec: keep using it.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of `n` f32s whose contents are unspecified (stale values from an
/// earlier use, or zeros): the caller must overwrite every element.
pub fn take_f32(n: usize) -> Vec<f32> {
    if n.saturating_mul(4) < MIN_BYTES {
        return vec![0.0; n];
    }
    let found = {
        let mut p = pool();
        // The smallest buffer that holds n without wasting over a third.
        let best = p
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= n && b.capacity() - n <= b.capacity() / 3)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        best.map(|i| {
            let b = p.bufs.swap_remove(i);
            p.bytes -= b.capacity() * 4;
            b
        })
    };
    match found {
        Some(mut b) => {
            if b.len() >= n {
                b.truncate(n);
            } else {
                b.resize(n, 0.0);
            }
            b
        }
        None => vec![0.0; n],
    }
}

/// Gives a buffer back for reuse (or frees it when small or the pool is full).
pub fn recycle(v: Vec<f32>) {
    let bytes = v.capacity() * 4;
    if bytes < MIN_BYTES {
        return;
    }
    let mut p = pool();
    if p.bytes + bytes <= MAX_POOL_BYTES {
        p.bytes += bytes;
        p.bufs.push(v);
    }
}

/// [`recycle`] for a tensor's f32 storage; other dtypes are just dropped.
pub fn recycle_tensor(t: Tensor) {
    if let TensorData::F32(v) = t.into_data() {
        recycle(v);
    }
}

/// Bytes held idle in the pool (for tests and diagnostics).
pub fn pooled_bytes() -> usize {
    pool().bytes
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
        let before = pooled_bytes();
        recycle(a);
        assert_eq!(pooled_bytes(), before + n * 4);
        // A slightly smaller request reuses it: same memory, right length.
        let b = take_f32(n - 100);
        assert_eq!(b.len(), n - 100);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(pooled_bytes(), before);
        // Far smaller requests do not take a buffer that would waste most of it.
        recycle(b);
        let c = take_f32(n / 2);
        assert_ne!(c.as_ptr(), ptr);
        assert!(c.iter().all(|&v| v == 0.0), "a fresh buffer is zeroed");
        // Growing within capacity keeps the memory.
        let d = take_f32(n);
        assert_eq!(d.as_ptr(), ptr);
        assert_eq!(d.len(), n);
        // Small buffers are not pooled.
        let before = pooled_bytes();
        recycle(vec![0.0; 16]);
        recycle_tensor(Tensor::from_vec(vec![2], vec![1i64, 2]).unwrap());
        assert_eq!(pooled_bytes(), before);
        recycle_tensor(Tensor::from_vec(vec![n], d).unwrap());
        assert_eq!(pooled_bytes(), before + n * 4);
        drop(c);
    }
}
