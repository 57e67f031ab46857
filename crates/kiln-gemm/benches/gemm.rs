//! Criterion benchmarks of `kiln_gemm::sgemm` (issue 4).
//!
//! `cargo bench -p kiln-gemm --bench gemm` (add `-- --quick`, or a filter such
//! as `-- sgemm_models_t2`). Every benchmark declares
//! `Throughput::Elements(2*M*N*K)`, so the "elements/s" criterion prints is
//! FLOP/s (one multiply and one add per inner-product term).
//!
//! Groups:
//! - `sgemm_square_t{1,2}`: square M=K=N in 256..2048, B as a plain row-major
//!   matrix (`unpacked`) and prepacked once outside the timing (`packed_b`);
//! - `sgemm_models_t{1,2}`: the (M, K, N) of real layers. The weight operand is
//!   the one a model would prepack: B for MatMul layers (BERT, the LM head), A
//!   for conv-as-GEMM (ResNet-50, MobileNetV2: A = W [M, C*kh*kw],
//!   B = im2col columns [C*kh*kw, OH*OW]);
//! - `sgemm_reference`: the plain f64-accumulating definition at 256, to show
//!   the speedup over it.
//!
//! `t1`/`t2` run inside a rayon pool of 1 and 2 threads. Short warm-up and
//! measurement times, 10 flat samples and 10k bootstrap resamples (criterion's
//! defaults are 100 and 100k) keep a full `cargo bench` of this file near two
//! to three minutes; raise them for finer comparisons.

use criterion::{
    black_box, criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use kiln_gemm::{sgemm, sgemm_reference, Lhs, MatRef, PackedA, PackedB, Rhs};
use std::time::Duration;

/// Deterministic values in [-0.6, 0.6] (no NaN/denormals to skew timings).
fn data(len: usize, mul: usize, modulus: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * mul % modulus) as f32 - (modulus / 2) as f32) * 0.1)
        .collect()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("building a rayon pool for the benchmark")
}

/// Which operand a model holds constant, and so prepacks.
#[derive(Clone, Copy, PartialEq)]
enum Weight {
    /// MatMul layers: activations [M, K] x W [K, N].
    B,
    /// Conv as GEMM: W [M, K] x columns [K, N].
    A,
}

/// One product's operands and output, with the weight side packed once.
struct Problem {
    m: usize,
    k: usize,
    n: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    /// C is `c[c_off..][..m * n]`, on a 64-byte line (plus `skew` floats).
    c: Vec<f32>,
    c_off: usize,
    packed_a: Option<PackedA>,
    packed_b: Option<PackedB>,
}

impl Problem {
    fn new(m: usize, k: usize, n: usize, weight: Weight) -> Problem {
        Problem::skewed(m, k, n, weight, 0)
    }

    /// C starts `skew` floats past a 64-byte line: the GEMM streams the
    /// stores of a C that big only on line-aligned rows.
    fn skewed(m: usize, k: usize, n: usize, weight: Weight, skew: usize) -> Problem {
        let a = data(m * k, 7, 13);
        let b = data(k * n, 5, 11);
        let (packed_a, packed_b) = match weight {
            Weight::A => (Some(PackedA::new(MatRef::row_major(&a, m, k))), None),
            Weight::B => (None, Some(PackedB::new(MatRef::row_major(&b, k, n)))),
        };
        let c = vec![0.0; m * n + 16 + skew];
        let c_off = c.as_ptr().align_offset(64).min(16) + skew;
        Problem {
            m,
            k,
            n,
            c,
            c_off,
            a,
            b,
            packed_a,
            packed_b,
        }
    }

    fn flops(&self) -> u64 {
        2 * (self.m * self.n * self.k) as u64
    }

    /// `C = A·B` with the operands as given (`packed`: the prepacked weight).
    fn run(&mut self, packed: bool) {
        let (m, k, n) = (self.m, self.k, self.n);
        let lhs = match (&self.packed_a, packed) {
            (Some(pa), true) => Lhs::Packed(pa),
            _ => Lhs::Mat(MatRef::row_major(&self.a, m, k)),
        };
        let rhs = match (&self.packed_b, packed) {
            (Some(pb), true) => Rhs::Packed(pb),
            _ => Rhs::Mat(MatRef::row_major(&self.b, k, n)),
        };
        sgemm(
            1.0,
            lhs,
            rhs,
            0.0,
            &mut self.c[self.c_off..][..m * n],
            n,
            None,
        );
        black_box(&mut self.c);
    }
}

/// Benchmarks `problem` unpacked and with its weight prepacked, in `pool`.
fn bench_both(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    pool: &rayon::ThreadPool,
    name: &str,
    problem: &mut Problem,
) {
    group.throughput(Throughput::Elements(problem.flops()));
    let packed_name = if problem.packed_a.is_some() {
        "packed_a"
    } else {
        "packed_b"
    };
    for (path, packed) in [("unpacked", false), (packed_name, true)] {
        group.bench_function(BenchmarkId::new(path, name), |bch| {
            bch.iter(|| pool.install(|| problem.run(packed)))
        });
    }
}

fn square(c: &mut Criterion) {
    for threads in [1, 2] {
        let pool = pool(threads);
        let mut group = c.benchmark_group(format!("sgemm_square_t{threads}"));
        // Flat sampling: 10 samples of equal iteration counts, so 2048^3
        // (17 GFLOP, ~0.1-0.2 s on one core) does not need 55 iterations.
        group
            .sample_size(10)
            .nresamples(10_000)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for size in [256, 512, 1024, 2048] {
            let mut p = Problem::new(size, size, size, Weight::B);
            bench_both(&mut group, &pool, &size.to_string(), &mut p);
        }
        group.finish();
    }
}

/// (name, M, K, N, weight side) of real layers, batch 1.
const MODEL_SHAPES: &[(&str, usize, usize, usize, Weight)] = &[
    // BERT-base, sequence 128: QKV/attention-output projection, FFN up, FFN down.
    ("bert_qkv_128x768x768", 128, 768, 768, Weight::B),
    ("bert_ffn_up_128x768x3072", 128, 768, 3072, Weight::B),
    ("bert_ffn_down_128x3072x768", 128, 3072, 768, Weight::B),
    // A GPT-2-sized LM head, cut from 50257 to 8192 vocabulary columns to keep
    // the run short (same per-column work).
    ("lm_head_128x768x8192", 128, 768, 8192, Weight::B),
    // ResNet-50 convs as GEMM: 3x3 64->64 at 56x56, 1x1 64->256 at 56x56,
    // 3x3 512->512 at 7x7, 1x1 512->2048 at 7x7.
    ("resnet50_3x3_64_56_64x576x3136", 64, 576, 3136, Weight::A),
    (
        "resnet50_1x1_64to256_56_256x64x3136",
        256,
        64,
        3136,
        Weight::A,
    ),
    ("resnet50_3x3_512_7_512x4608x49", 512, 4608, 49, Weight::A),
    (
        "resnet50_1x1_512to2048_7_2048x512x49",
        2048,
        512,
        49,
        Weight::A,
    ),
    // MobileNetV2 pointwise convs: 1x1 16->96 at 112, 1x1 32->16 at 112,
    // 1x1 144->24 at 56 (thin K and M, long N).
    ("mbv2_pw_16to96_112_96x16x12544", 96, 16, 12544, Weight::A),
    ("mbv2_pw_32to16_112_16x32x12544", 16, 32, 12544, Weight::A),
    ("mbv2_pw_144to24_56_24x144x3136", 24, 144, 3136, Weight::A),
];

fn models(c: &mut Criterion) {
    for threads in [1, 2] {
        let pool = pool(threads);
        let mut group = c.benchmark_group(format!("sgemm_models_t{threads}"));
        group
            .sample_size(10)
            .nresamples(10_000)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        for &(name, m, k, n, weight) in MODEL_SHAPES {
            let mut p = Problem::new(m, k, n, weight);
            bench_both(&mut group, &pool, name, &mut p);
        }
        // MobileNetV2's 16 -> 96 1x1 at batch 8 as one product: a 38 MiB C,
        // past `stream_min_bytes`, stored by streaming stores when its rows
        // start on a cache line and by plain ones when they do not.
        for (name, skew) in [
            ("mbv2_pw_16to96_112_b8_96x16x100352_streamed", 0),
            ("mbv2_pw_16to96_112_b8_96x16x100352_c_off_line", 4),
        ] {
            let mut p = Problem::skewed(96, 16, 8 * 12544, Weight::A, skew);
            bench_both(&mut group, &pool, name, &mut p);
        }
        group.finish();
    }
}

fn reference(c: &mut Criterion) {
    let size = 256;
    let mut p = Problem::new(size, size, size, Weight::B);
    let mut group = c.benchmark_group("sgemm_reference");
    group
        .sample_size(10)
        .nresamples(10_000)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(p.flops()));
    group.bench_function(BenchmarkId::new("reference", size), |bch| {
        bch.iter(|| {
            sgemm_reference(
                1.0,
                Lhs::Mat(MatRef::row_major(&p.a, size, size)),
                Rhs::Mat(MatRef::row_major(&p.b, size, size)),
                0.0,
                &mut p.c,
                size,
                None,
            );
            black_box(&mut p.c);
        })
    });
    group.finish();
}

criterion_group!(benches, square, models, reference);
criterion_main!(benches);
