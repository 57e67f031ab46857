//! GFLOP/s of one shape: `cargo run --release -p kiln-gemm --example gemm_shape -- M K N [THREADS] [packed]`.
//! For tuning: `KILN_GEMM_KC`, `KILN_GEMM_NCB`, `KILN_GEMM_MCB` and
//! `KILN_GEMM_KERNEL` override the blocking and the kernel. Best of several runs.

use kiln_gemm::{selected_kernel, sgemm, Lhs, MatRef, PackedB, Rhs};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (m, k, n, threads) = (num(0, 1024), num(1, 1024), num(2, 1024), num(3, 1));
    let packed = args.iter().any(|a| a == "packed");
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
        .collect();
    let mut c = vec![0f32; m * n];
    let pb = PackedB::new(MatRef::row_major(&b, k, n));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let mut run = || {
        let rhs = if packed {
            Rhs::Packed(&pb)
        } else {
            Rhs::Mat(MatRef::row_major(&b, k, n))
        };
        pool.install(|| {
            sgemm(
                1.0,
                Lhs::Mat(MatRef::row_major(&a, m, k)),
                rhs,
                0.0,
                &mut c,
                n,
                None,
            )
        });
    };
    run();
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut reps = 0;
    while reps < 3 || (start.elapsed() < Duration::from_secs(2) && reps < 500) {
        let t = Instant::now();
        run();
        best = best.min(t.elapsed().as_secs_f64());
        reps += 1;
    }
    let gf = 2.0 * (m * n * k) as f64 / best / 1e9;
    println!("{} {m}x{k}x{n} threads={threads} packed={packed}: {gf:.1} GFLOP/s ({:.3} ms best of {reps})", selected_kernel(), best * 1e3);
}
