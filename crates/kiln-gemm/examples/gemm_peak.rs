//! GFLOP/s of `kiln_gemm::sgemm` on square and model shapes at 1 and 2 threads,
//! against this machine's measured peak (an FMA-throughput loop) and against
//! the i-k-j blocked loop kiln-cpu used before (`gemm_acc`, copied below).
//!
//! `cargo run --release -p kiln-gemm --example gemm_peak [-- --quick]`
//!
//! Timings are the best of several repetitions (the machine is shared, so the
//! best run is the one least disturbed by other processes).

use kiln_gemm::{selected_kernel, sgemm, Lhs, MatRef, PackedA, PackedB, Rhs};
use std::time::{Duration, Instant};

fn rand_vec(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// Best seconds per call of `f` over repetitions filling about `budget`.
fn best_time(budget: Duration, mut f: impl FnMut()) -> f64 {
    f(); // warm up (page faults, thread-local buffers)
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut reps = 0;
    while reps < 3 || (start.elapsed() < budget && reps < 200) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        reps += 1;
    }
    best
}

/// Peak f32 FLOP/s of one core from a loop of independent 512-bit (or 256-bit) FMAs.
#[cfg(target_arch = "x86_64")]
fn fma_peak_one_core() -> Option<(f64, &'static str)> {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f")]
    unsafe fn zmm(iters: u64) -> f32 {
        let mut acc = [_mm512_set1_ps(1.0); 12];
        let x = _mm512_set1_ps(0.999_999);
        let y = _mm512_set1_ps(1e-7);
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, x, y);
            }
        }
        let mut s = _mm512_setzero_ps();
        for a in acc {
            s = _mm512_add_ps(s, a);
        }
        _mm512_reduce_add_ps(s)
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn ymm(iters: u64) -> f32 {
        let mut acc = [_mm256_set1_ps(1.0); 12];
        let x = _mm256_set1_ps(0.999_999);
        let y = _mm256_set1_ps(1e-7);
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, x, y);
            }
        }
        let mut out = [0f32; 8];
        let mut s = _mm256_setzero_ps();
        for a in acc {
            s = _mm256_add_ps(s, a);
        }
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }
    let iters = 20_000_000u64;
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected.
        let t = best_time(Duration::from_millis(300), || {
            std::hint::black_box(unsafe { zmm(std::hint::black_box(iters)) });
        });
        Some((iters as f64 * 12.0 * 16.0 * 2.0 / t, "avx512 fma"))
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: AVX2 and FMA were just detected.
        let t = best_time(Duration::from_millis(300), || {
            std::hint::black_box(unsafe { ymm(std::hint::black_box(iters)) });
        });
        Some((iters as f64 * 12.0 * 8.0 * 2.0 / t, "avx2 fma"))
    } else {
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_peak_one_core() -> Option<(f64, &'static str)> {
    None
}

/// The f32 `gemm_acc` of kiln-cpu (i-k-j, four rows of C per pass, KC/NC blocks).
fn gemm_acc(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    const KC: usize = 256;
    const NC: usize = 512;
    for p0 in (0..k).step_by(KC) {
        let p1 = (p0 + KC).min(k);
        for j0 in (0..n).step_by(NC) {
            let j1 = (j0 + NC).min(n);
            let mut i = 0;
            while i + 4 <= m {
                let (c01, c23) = c[i * n..(i + 4) * n].split_at_mut(2 * n);
                let (r0, r1) = c01.split_at_mut(n);
                let (r2, r3) = c23.split_at_mut(n);
                let (c0, c1, c2, c3) = (
                    &mut r0[j0..j1],
                    &mut r1[j0..j1],
                    &mut r2[j0..j1],
                    &mut r3[j0..j1],
                );
                for p in p0..p1 {
                    let (x0, x1, x2, x3) = (
                        a[i * k + p],
                        a[(i + 1) * k + p],
                        a[(i + 2) * k + p],
                        a[(i + 3) * k + p],
                    );
                    let br = &b[p * n + j0..p * n + j1];
                    for ((((y0, y1), y2), y3), &bv) in c0
                        .iter_mut()
                        .zip(c1.iter_mut())
                        .zip(c2.iter_mut())
                        .zip(c3.iter_mut())
                        .zip(br)
                    {
                        *y0 += x0 * bv;
                        *y1 += x1 * bv;
                        *y2 += x2 * bv;
                        *y3 += x3 * bv;
                    }
                }
                i += 4;
            }
            while i < m {
                for p in p0..p1 {
                    let x = a[i * k + p];
                    let br = &b[p * n + j0..p * n + j1];
                    for (y, &bv) in c[i * n + j0..i * n + j1].iter_mut().zip(br) {
                        *y += x * bv;
                    }
                }
                i += 1;
            }
        }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 300 } else { 1500 });
    let hw = kiln_hw::cpu();
    println!(
        "kernel: {}  cpu: {}  cores: {}  caches: {:?}",
        selected_kernel(),
        hw.model_name.as_deref().unwrap_or("?"),
        hw.cores,
        hw.caches
    );
    let peak1 = fma_peak_one_core();
    let peak2 = peak1.map(|(p1, _)| {
        // Both cores at once: each thread runs the same loop.
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| fma_peak_one_core());
            }
        });
        let _ = t;
        2.0 * p1
    });
    match peak1 {
        Some((p, how)) => println!(
            "measured peak ({how} loop): {:.1} GFLOP/s per core, {:.1} GFLOP/s for 2 cores (2 x one core)",
            p / 1e9,
            peak2.unwrap_or(0.0) / 1e9
        ),
        None => println!("no FMA peak loop for this CPU"),
    }

    // (name, m, k, n, packed B?)
    let shapes: &[(&str, usize, usize, usize, bool)] = &[
        ("square 256", 256, 256, 256, false),
        ("square 512", 512, 512, 512, false),
        ("square 1024", 1024, 1024, 1024, false),
        ("square 2048", 2048, 2048, 2048, false),
        ("resnet conv2 3x3 (64x576 * 576x3136)", 64, 576, 3136, false),
        ("resnet conv 1x1 (256x64 * 64x3136)", 256, 64, 3136, false),
        (
            "resnet conv5 3x3 (512x4608 * 4608x49)",
            512,
            4608,
            49,
            false,
        ),
        ("bert qkv/out (128x768 * 768x768)", 128, 768, 768, true),
        ("bert ffn1 (128x768 * 768x3072)", 128, 768, 3072, true),
        ("bert ffn2 (128x3072 * 3072x768)", 128, 3072, 768, true),
        ("gemv (1x768 * 768x3072)", 1, 768, 3072, true),
    ];
    println!(
        "{:<40} {:>10} {:>10} {:>8} {:>10} {:>8} {:>12}",
        "shape", "1 thread", "%peak", "", "2 threads", "%peak", "gemm_acc 1t"
    );
    for &(name, m, k, n, packed_b) in shapes {
        if quick && m * n * k > 1 << 30 {
            continue;
        }
        let a = rand_vec(m * k, 1);
        let b = rand_vec(k * n, 2);
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * m as f64 * n as f64 * k as f64;
        let pb = PackedB::new(MatRef::row_major(&b, k, n));
        let pa = PackedA::new(MatRef::row_major(&a, m, k));
        let _ = &pa;
        let mut rates = [0.0f64; 2];
        for (ti, threads) in [1usize, 2].into_iter().enumerate() {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            let t = pool.install(|| {
                best_time(budget, || {
                    let rhs = if packed_b {
                        Rhs::Packed(&pb)
                    } else {
                        Rhs::Mat(MatRef::row_major(&b, k, n))
                    };
                    sgemm(
                        1.0,
                        Lhs::Mat(MatRef::row_major(&a, m, k)),
                        rhs,
                        0.0,
                        &mut c,
                        n,
                        None,
                    );
                })
            });
            rates[ti] = flops / t;
        }
        let base = if m * n * k <= 1 << 28 || !quick {
            let t = best_time(budget / 2, || {
                c.fill(0.0);
                gemm_acc(m, k, n, &a, &b, &mut c);
            });
            format!("{:.1}", flops / t / 1e9)
        } else {
            "-".into()
        };
        let pct = |r: f64, p: Option<f64>| {
            p.map(|p| format!("{:.0}%", 100.0 * r / p))
                .unwrap_or_default()
        };
        println!(
            "{:<40} {:>10.1} {:>10} {:>8} {:>10.1} {:>8} {:>12}",
            format!("{name}{}", if packed_b { " [B packed]" } else { "" }),
            rates[0] / 1e9,
            pct(rates[0], peak1.map(|p| p.0)),
            "",
            rates[1] / 1e9,
            pct(rates[1], peak2),
            base
        );
    }
}
