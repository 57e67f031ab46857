//! GFLOP/s of one shape: `cargo run --release -p kiln-gemm --example gemm_shape -- M K N [THREADS] [packed]`.
//! For tuning: `KILN_GEMM_KC`, `KILN_GEMM_NCB`, `KILN_GEMM_MCB` and
//! `KILN_GEMM_KERNEL` override the blocking and the kernel. Best and median of several runs.
//! `cold` (with `packed`) cycles through enough packed copies of B to overflow the last-level
//! cache, as a model's weights do when each layer's are read once per run
//! (and cycles C likewise); `coldc` cycles only C, to tell the two apart.
//! `packa` prepacks A instead (a conv's weights, B the activations).
//! `finish` adds a row bias and a [0, 6] clamp in registers; `callback` does
//! the same in an epilogue callback (to compare the two).

use kiln_gemm::{selected_kernel, sgemm_fused, Finish, Lhs, MatRef, PackedA, PackedB, Rhs};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (m, k, n, threads) = (num(0, 1024), num(1, 1024), num(2, 1024), num(3, 1));
    let packed = args.iter().any(|a| a == "packed");
    let cold = args.iter().any(|a| a == "cold");
    let packa = args.iter().any(|a| a == "packa");
    let finish_mode = args.iter().any(|a| a == "finish");
    let callback_mode = args.iter().any(|a| a == "callback");
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
        .collect();
    // `cold` also cycles C through enough buffers to leave the caches.
    let cold_c_only = args.iter().any(|a| a == "coldc");
    let c_copies = if cold || cold_c_only {
        (64 << 20) / (4 * m * n).max(1) + 1
    } else {
        1
    };
    let mut cs = vec![vec![0f32; m * n]; c_copies];
    let mut next_c = 0;
    let row_bias: Vec<f32> = (0..m).map(|i| (i % 7) as f32 * 0.01).collect();
    let finish = if finish_mode {
        Finish {
            row_bias: Some(&row_bias),
            clamp: Some((0.0, 6.0)),
            ..Finish::default()
        }
    } else {
        Finish::default()
    };
    let callback = |i: usize, _j0: usize, vals: &mut [f32]| {
        let bv = row_bias[i];
        for v in vals.iter_mut() {
            let x = *v + bv;
            let x = if x < 0.0 { 0.0 } else { x };
            *v = if x > 6.0 { 6.0 } else { x };
        }
    };
    let pa = PackedA::new(MatRef::row_major(&a, m, k));
    // 96 MiB of copies outruns a 32 MiB L3 with room to spare.
    let copies = if cold {
        (96 * 1024 * 1024 / (4 * k * n).max(1)).max(2)
    } else {
        1
    };
    let pbs: Vec<PackedB> = (0..copies)
        .map(|_| PackedB::new(MatRef::row_major(&b, k, n)))
        .collect();
    let mut next = 0;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let mut run = || {
        next = (next + 1) % copies;
        next_c = (next_c + 1) % c_copies;
        let rhs = if packed {
            Rhs::Packed(&pbs[next])
        } else {
            Rhs::Mat(MatRef::row_major(&b, k, n))
        };
        let lhs = if packa {
            Lhs::Packed(&pa)
        } else {
            Lhs::Mat(MatRef::row_major(&a, m, k))
        };
        pool.install(|| {
            sgemm_fused(
                1.0,
                lhs,
                rhs,
                0.0,
                &mut cs[next_c],
                n,
                &finish,
                if callback_mode { Some(&callback) } else { None },
            )
        });
    };
    run();
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 3 || (start.elapsed() < Duration::from_secs(2) && times.len() < 500) {
        let t = Instant::now();
        run();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let (best, median, reps) = (times[0], times[times.len() / 2], times.len());
    let gf = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
    println!(
        "{} {m}x{k}x{n} threads={threads} packed={packed} cold={cold}: {:.1} GFLOP/s best, {:.1} median ({:.3} / {:.3} ms of {reps})",
        selected_kernel(),
        gf(best),
        gf(median),
        best * 1e3,
        median * 1e3
    );
}
