//! Measured peaks: FMA-throughput loops (f32, bf16 dot products, int8 dot
//! products) and a streaming memory-bandwidth pass, each run on `threads` std
//! threads at once.
//!
//! The numbers are what this machine sustains on an ideal instruction stream:
//! many independent accumulators, no loads, so the loop is bound by the FMA
//! ports alone. Real kernels reach a share of them; `kiln bench` reports that
//! share.

use serde::{Deserialize, Serialize};
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Peak throughput and memory bandwidth measured on this machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// How many threads ran the loops at once.
    pub threads: usize,
    /// Peak f32 multiply-add throughput (an FMA counts 2 FLOPs).
    pub peak_f32_gflops: f64,
    /// Which loop measured `peak_f32_gflops`: `avx512`, `avx2+fma`, `neon` or `portable`.
    pub f32_path: String,
    /// Peak bf16 dot-product throughput (`vdpbf16ps`), when the CPU has AVX512_BF16.
    pub peak_bf16_gflops: Option<f64>,
    /// Peak u8 x i8 dot-product throughput (`vpdpbusd`), when the CPU has AVX512_VNNI.
    pub peak_int8_gops: Option<f64>,
    /// Sustained read+write bandwidth of a stream much larger than the caches.
    pub mem_bandwidth_gbs: f64,
}

/// How long each timed loop runs (per repetition).
const TARGET: Duration = Duration::from_millis(70);
/// Timed repetitions per loop; the best one counts (others may be disturbed).
const REPEATS: usize = 2;
/// Size of the bandwidth buffer: far larger than any L3.
const STREAM_BYTES: usize = 256 << 20;

/// Measures every peak this CPU supports with `threads` threads (at least 1).
/// Takes about a second.
pub fn measure(threads: usize) -> Measured {
    let threads = threads.max(1);
    let (f32_path, f32_kernel) = f32_kernel();
    Measured {
        threads,
        peak_f32_gflops: peak(threads, f32_kernel) / 1e9,
        f32_path: f32_path.to_string(),
        peak_bf16_gflops: bf16_kernel().map(|k| peak(threads, k) / 1e9),
        peak_int8_gops: int8_kernel().map(|k| peak(threads, k) / 1e9),
        mem_bandwidth_gbs: bandwidth(threads) / 1e9,
    }
}

/// A throughput loop: runs `iters` iterations and returns the operations done
/// (FLOPs, or integer ops) so the caller can divide by the time.
type Kernel = fn(u64) -> f64;

/// Runs `kernel` on `threads` threads at once and returns operations per second
/// (all threads together), the best of [`REPEATS`] timed runs.
fn peak(threads: usize, kernel: Kernel) -> f64 {
    // Calibrate on one thread: grow the count until a run takes >= 5 ms.
    let mut iters: u64 = 1 << 12;
    let per_iter = loop {
        let t = Instant::now();
        black_box(kernel(iters));
        let dt = t.elapsed();
        if dt >= Duration::from_millis(5) || iters >= 1 << 40 {
            break dt.as_secs_f64() / iters as f64;
        }
        iters *= 4;
    };
    let iters = ((TARGET.as_secs_f64() / per_iter.max(1e-12)) as u64).max(1);
    let mut best: f64 = 0.0;
    for _ in 0..REPEATS {
        let barrier = Barrier::new(threads);
        let results: Vec<(f64, Duration)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let t = Instant::now();
                        let ops = kernel(iters);
                        (ops, t.elapsed())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("peak-measurement thread panicked"))
                .collect()
        });
        let ops: f64 = results.iter().map(|r| r.0).sum();
        // The slowest thread bounds the time all of them needed together.
        let secs = results
            .iter()
            .map(|r| r.1.as_secs_f64())
            .fold(0.0, f64::max);
        if secs > 0.0 {
            best = best.max(ops / secs);
        }
    }
    best
}

/// The widest f32 FMA loop this CPU runs.
fn f32_kernel() -> (&'static str, Kernel) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return ("avx512", x86::fma_avx512);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return ("avx2+fma", x86::fma_avx2);
        }
    }
    ("portable", fma_portable)
}

fn bf16_kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
        {
            return Some(x86::dot_bf16_avx512);
        }
    }
    None
}

fn int8_kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512f")
        {
            return Some(x86::dot_int8_avx512);
        }
    }
    None
}

/// Plain Rust multiply-adds over independent lanes; the compiler vectorizes it
/// to the baseline SIMD width (SSE2 on x86_64, NEON on aarch64).
fn fma_portable(iters: u64) -> f64 {
    const LANES: usize = 64;
    let mut acc = [0.0f32; LANES];
    let a = black_box(0.999_99f32);
    let b = black_box(1e-6f32);
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = *x * a + b;
        }
    }
    black_box(acc.iter().sum::<f32>());
    // One multiply and one add per lane and iteration.
    2.0 * LANES as f64 * iters as f64
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;
    use std::hint::black_box;

    /// Independent accumulator chains: enough to cover FMA latency (4 cycles)
    /// times the FMA ports (2) with room to spare, and few enough to stay in
    /// registers (32 zmm, 16 ymm).
    const ACC_512: usize = 16;
    const ACC_256: usize = 12;

    pub fn fma_avx512(iters: u64) -> f64 {
        // SAFETY: only returned by `f32_kernel` after `is_x86_feature_detected!("avx512f")`.
        unsafe { fma_avx512_impl(iters) }
    }

    #[target_feature(enable = "avx512f")]
    fn fma_avx512_impl(iters: u64) -> f64 {
        let a = _mm512_set1_ps(black_box(0.999_99));
        let b = _mm512_set1_ps(black_box(1e-6));
        let mut acc = [_mm512_setzero_ps(); ACC_512];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        black_box(_mm512_reduce_add_ps(s));
        // 16 lanes x (multiply + add) per FMA.
        (ACC_512 * 16 * 2) as f64 * iters as f64
    }

    pub fn fma_avx2(iters: u64) -> f64 {
        // SAFETY: only returned by `f32_kernel` after detecting avx2 and fma.
        unsafe { fma_avx2_impl(iters) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn fma_avx2_impl(iters: u64) -> f64 {
        let a = _mm256_set1_ps(black_box(0.999_99));
        let b = _mm256_set1_ps(black_box(1e-6));
        let mut acc = [_mm256_setzero_ps(); ACC_256];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0.0f32; 8];
        // SAFETY: `out` holds 8 f32, the width of one unaligned 256-bit store.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        black_box(out);
        (ACC_256 * 8 * 2) as f64 * iters as f64
    }

    pub fn dot_bf16_avx512(iters: u64) -> f64 {
        // SAFETY: only returned by `bf16_kernel` after detecting avx512f and avx512bf16.
        unsafe { dot_bf16_impl(iters) }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    fn dot_bf16_impl(iters: u64) -> f64 {
        let a = _mm512_cvtne2ps_pbh(
            _mm512_set1_ps(black_box(0.5)),
            _mm512_set1_ps(black_box(0.25)),
        );
        let b = _mm512_cvtne2ps_pbh(
            _mm512_set1_ps(black_box(1e-3)),
            _mm512_set1_ps(black_box(2e-3)),
        );
        let mut acc = [_mm512_setzero_ps(); ACC_512];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        black_box(_mm512_reduce_add_ps(s));
        // 16 f32 lanes, each adding 2 bf16 products: 4 FLOPs per lane.
        (ACC_512 * 16 * 4) as f64 * iters as f64
    }

    pub fn dot_int8_avx512(iters: u64) -> f64 {
        // SAFETY: only returned by `int8_kernel` after detecting avx512f and avx512vnni.
        unsafe { dot_int8_impl(iters) }
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    fn dot_int8_impl(iters: u64) -> f64 {
        let a = _mm512_set1_epi8(black_box(3));
        let b = _mm512_set1_epi8(black_box(-2));
        let mut acc = [_mm512_setzero_si512(); ACC_512];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_si512();
        for x in acc {
            s = _mm512_add_epi32(s, x);
        }
        black_box(_mm512_reduce_add_epi32(s));
        // 16 i32 lanes, each adding 4 u8 x i8 products: 8 ops per lane.
        (ACC_512 * 16 * 8) as f64 * iters as f64
    }
}

/// Read+write bandwidth in bytes per second: each thread scales its share of a
/// [`STREAM_BYTES`] buffer in place (one read and one write per element); the
/// best of several passes counts.
fn bandwidth(threads: usize) -> f64 {
    let n = STREAM_BYTES / std::mem::size_of::<f32>();
    let chunk = n.div_ceil(threads);
    let mut buf: Vec<f32> = Vec::new();
    // Touch the pages from the threads that stream them (first-touch NUMA).
    buf.reserve_exact(n);
    buf.resize(n, 0.0);
    std::thread::scope(|s| {
        for part in buf.chunks_mut(chunk) {
            s.spawn(move || {
                for (i, x) in part.iter_mut().enumerate() {
                    *x = (i % 1024) as f32;
                }
            });
        }
    });
    let start = Instant::now();
    let mut best: f64 = 0.0;
    let mut passes = 0;
    while passes < 3 || (start.elapsed() < Duration::from_millis(250) && passes < 20) {
        passes += 1;
        let barrier = Barrier::new(threads);
        let times: Vec<Duration> = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks_mut(chunk)
                .map(|part| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        let t = Instant::now();
                        for x in part.iter_mut() {
                            *x = *x * 0.999 + 0.5;
                        }
                        black_box(&part[0]);
                        t.elapsed()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("bandwidth thread panicked"))
                .collect()
        });
        let secs = times.iter().map(Duration::as_secs_f64).fold(0.0, f64::max);
        if secs > 0.0 {
            best = best.max(2.0 * STREAM_BYTES as f64 / secs);
        }
    }
    black_box(buf[n / 2]);
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn positive_finite(x: f64) -> bool {
        x.is_finite() && x > 0.0
    }

    #[test]
    fn every_kernel_reports_positive_finite_rates() {
        let (_, k) = f32_kernel();
        assert!(positive_finite(peak(1, k)));
        assert!(positive_finite(peak(2, fma_portable)));
        if let Some(k) = bf16_kernel() {
            assert!(positive_finite(peak(1, k)));
        }
        if let Some(k) = int8_kernel() {
            assert!(positive_finite(peak(1, k)));
        }
    }

    #[test]
    fn kernels_count_the_work_they_do() {
        // The op count is linear in the iteration count (no hidden constant).
        let (_, k) = f32_kernel();
        assert_eq!(k(20), 2.0 * k(10));
        assert_eq!(fma_portable(3), 3.0 * 2.0 * 64.0);
    }

    #[test]
    fn measurement_is_positive_and_finite() {
        let m = measure(2);
        assert_eq!(m.threads, 2);
        assert!(positive_finite(m.peak_f32_gflops), "{m:?}");
        assert!(positive_finite(m.mem_bandwidth_gbs), "{m:?}");
        assert!(m.peak_bf16_gflops.is_none_or(positive_finite), "{m:?}");
        assert!(m.peak_int8_gops.is_none_or(positive_finite), "{m:?}");
        // The optional peaks are there exactly when the CPU has the instructions.
        assert_eq!(m.peak_bf16_gflops.is_some(), bf16_kernel().is_some());
        assert_eq!(m.peak_int8_gops.is_some(), int8_kernel().is_some());
    }
}
