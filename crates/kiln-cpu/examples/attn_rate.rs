//! Time of one fused attention op on BERT-base's layout (heads split out of
//! `[B, S, 768]` by the absorbed Transposes, an additive `[B, 1, 1, S]` mask,
//! or with `CAUSAL=1` GPT-2's causal `Where` mask, scores divided by 8): `cargo run --release -p kiln-cpu --example attn_rate
//! -- [S] [B] [THREADS]` (defaults 128, 1, 2). Prints the best and median of
//! 200 runs and the GFLOP/s of the two products.

use kiln_cpu::fused::run;
use kiln_ir::{AttnLayout, AttnMask, AttnScale, FusedOp, Tensor};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|s| s.parse().ok())
        .collect();
    let s = args.first().copied().unwrap_or(128);
    let b = args.get(1).copied().unwrap_or(1);
    let threads = args.get(2).copied().unwrap_or(2);
    let (h, d) = (12, 64);
    let vals = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 - 500.0) * 0.002)
            .collect()
    };
    let qkv_shape = vec![b, s, h, d];
    let n = b * s * h * d;
    let q = Tensor::from_vec(qkv_shape.clone(), vals(n, 1)).expect("Q");
    let k = Tensor::from_vec(qkv_shape.clone(), vals(n, 2)).expect("K");
    let v = Tensor::from_vec(qkv_shape, vals(n, 3)).expect("V");
    // CAUSAL=1: GPT-2's causal mask, a bool [1, 1, S, S] selecting the
    // scores to keep (`Where`); else BERT's additive [B, 1, 1, S] one.
    let causal = std::env::var_os("CAUSAL").is_some();
    let (mask, kind) = if causal {
        let keep: Vec<bool> = (0..s * s).map(|i| i % s <= i / s).collect();
        let m = Tensor::from_vec(vec![1, 1, s, s], keep).expect("mask");
        let kind = AttnMask::Where {
            fill: f32::MIN,
            keep_if_true: true,
        };
        (m, kind)
    } else {
        let m = Tensor::from_vec(vec![b, 1, 1, s], vec![0f32; b * s]).expect("mask");
        (m, AttnMask::Add)
    };
    let op = FusedOp::Attention {
        scale: AttnScale::Div(8.0),
        mask: kind,
        layout: AttnLayout {
            inputs: [
                Some(vec![0, 2, 1, 3]),
                Some(vec![0, 2, 3, 1]),
                Some(vec![0, 2, 1, 3]),
            ],
            out: Some(vec![0, 2, 1, 3]),
        },
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    // COLD=1: stream 64 MiB through the caches before each run, as a
    // model's other layers do between two attention ops.
    let cold = std::env::var_os("COLD").is_some();
    let mut junk = vec![0f32; if cold { 16 << 20 } else { 0 }];
    let mut times = pool.install(|| {
        (0..(if std::env::var_os("LONG").is_some() {
            5000
        } else {
            220
        }))
            .map(|i| {
                junk.iter_mut().for_each(|x| *x += i as f32);
                let t = Instant::now();
                let y = run(&op, &[Some(&q), Some(&k), Some(&v), Some(&mask)]).expect("attention");
                std::hint::black_box(y);
                t.elapsed().as_secs_f64() * 1e3
            })
            .skip(20)
            .collect::<Vec<f64>>()
    });
    times.sort_by(f64::total_cmp);
    if std::env::var_os("DIST").is_some() {
        let q: Vec<String> = (0..10)
            .map(|i| format!("{:.3}", times[i * times.len() / 10]))
            .collect();
        println!("deciles: {}", q.join(" "));
    }
    let flops = 4.0 * (b * h * s * s * d) as f64;
    println!(
        "attention B={b} S={s} heads={h} d={d} threads={threads}: best {:.3} ms, median {:.3} ms ({:.0} GFLOP/s at best)",
        times[0],
        times[times.len() / 2],
        flops / times[0] / 1e6
    );
}
