//! What a sleeping rayon worker costs a plan, and what `install_warm` buys.
//!
//! `cargo run --release -p kiln-runtime --example warm_pool`
//!
//! Each round is a sequential stretch on one thread (like a small node or
//! the glue between kernels) followed by a parallel region of 8 tasks of
//! 5 us. On 2 threads the ideal round takes `gap + 20` us. After a gap of a
//! few tens of microseconds an idle rayon worker has gone to sleep, and the
//! region runs mostly on the one thread still awake.

use rayon::prelude::*;
use std::time::Instant;

fn busy(us: f64) {
    let t = Instant::now();
    while t.elapsed().as_secs_f64() * 1e6 < us {
        std::hint::spin_loop();
    }
}

fn rounds(gap_us: f64) -> f64 {
    const ROUNDS: usize = 2000;
    let t = Instant::now();
    for _ in 0..ROUNDS {
        // What the executor does before each step (nothing outside
        // `install_warm`).
        kiln_runtime::rewarm();
        busy(gap_us);
        (0..8)
            .into_par_iter()
            .with_max_len(1)
            .for_each(|_| busy(5.0));
    }
    t.elapsed().as_secs_f64() * 1e6 / ROUNDS as f64
}

fn main() {
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(2).build() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot start a pool of 2 threads: {e}");
            std::process::exit(1);
        }
    };
    println!("gap_us  ideal_us  install_us  install_warm_us");
    for gap in [2.0, 20.0, 60.0, 150.0, 400.0, 1000.0] {
        let plain = pool.install(|| rounds(gap));
        let warm = kiln_runtime::install_warm(&pool, || rounds(gap));
        println!("{gap:6.0}  {:8.1}  {plain:10.1}  {warm:15.1}", gap + 20.0);
    }
}
