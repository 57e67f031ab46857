//! Throughput of the fast element-wise functions on one thread:
//! `cargo run --release -p kiln-cpu --example act_rate -- [N]` (N floats,
//! default 196608, a BERT-base FFN row block's share on one of two threads).
//! Reports ns per element and cycles per 16 elements at an assumed 4 GHz.

use kiln_cpu::fastmath::{apply_inplace, Func};
use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(196_608);
    let src: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 1001) as f32 - 500.0) * 0.01)
        .collect();
    for (name, f) in [
        ("relu", Func::Relu),
        ("exp", Func::Exp),
        ("sigmoid", Func::Sigmoid),
        ("silu", Func::Silu),
        ("tanh", Func::Tanh),
        ("erf", Func::Erf),
        ("gelu_erf", Func::GeluErf),
        ("gelu_tanh", Func::GeluTanh),
    ] {
        let mut best = f64::MAX;
        let mut v = src.clone();
        for _ in 0..200 {
            v.copy_from_slice(&src);
            let t = Instant::now();
            apply_inplace(f, &mut v);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let ns = best * 1e9 / n as f64;
        println!(
            "{name:10} {ns:6.3} ns/elem  {:5.1} cycles/16 @4GHz",
            ns * 4.0 * 16.0
        );
    }
}
