//! Criterion benchmarks of whole Conv ops (issue 4).
//!
//! `cargo bench -p kiln-cpu --bench conv` (add `-- --quick`, or a filter).
//! Each conv runs through the public `run_op` (weights packed on every call)
//! and, where the runtime would prepare it, through `prepare` +
//! `PreparedOp::run` (weights packed once, at plan time). Depthwise convs take
//! the direct kernel, which `prepare` declines, so they have `run_op` only.
//! A prepared one-group conv times its strategies on its first run and
//! keeps the fastest (`tune.rs`; remembered in the tuning cache file, off
//! with `KILN_TUNE=0`), as in the runtime.
//!
//! Throughput is `Throughput::Elements(FLOPs)` with
//! FLOPs = 2 * N * M * (C/group) * kh * kw * OH * OW, so criterion's
//! "elements/s" is FLOP/s. Everything runs in a 2-thread rayon pool; batch 1.
//! 10 flat samples and short times keep the whole file under a minute.

use criterion::{
    black_box, criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use kiln_cpu::{prepare, run_op};
use kiln_ir::{AutoPad, ConvAttrs, Op, Tensor};
use std::time::Duration;

/// One 2-D convolution: input [1, C, H, W], weight [M, C/group, k, k].
struct ConvCase {
    name: &'static str,
    c: usize,
    m: usize,
    group: usize,
    hw: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

const CASES: &[ConvCase] = &[
    // ResNet-50 stem: 7x7/2, 3->64, 224 -> 112.
    ConvCase {
        name: "resnet50_stem_7x7s2_3to64_224",
        c: 3,
        m: 64,
        group: 1,
        hw: 224,
        k: 7,
        stride: 2,
        pad: 3,
    },
    // ResNet-50 stage 1 3x3 and the 1x1 reduce.
    ConvCase {
        name: "resnet50_3x3_64to64_56",
        c: 64,
        m: 64,
        group: 1,
        hw: 56,
        k: 3,
        stride: 1,
        pad: 1,
    },
    ConvCase {
        name: "resnet50_1x1_256to64_56",
        c: 256,
        m: 64,
        group: 1,
        hw: 56,
        k: 1,
        stride: 1,
        pad: 0,
    },
    // ResNet-50 stage 4 3x3.
    ConvCase {
        name: "resnet50_3x3_512to512_7",
        c: 512,
        m: 512,
        group: 1,
        hw: 7,
        k: 3,
        stride: 1,
        pad: 1,
    },
    // MobileNetV2 depthwise 3x3.
    // Strided 3x3 convs: the gathered product when prepared.
    ConvCase {
        name: "resnet50_3x3s2_128_56to28",
        c: 128,
        m: 128,
        group: 1,
        hw: 56,
        k: 3,
        stride: 2,
        pad: 1,
    },
    ConvCase {
        name: "resnet50_3x3s2_512_14to7",
        c: 512,
        m: 512,
        group: 1,
        hw: 14,
        k: 3,
        stride: 2,
        pad: 1,
    },
    ConvCase {
        name: "yolov8n_3x3s2_128to256_20to10",
        c: 128,
        m: 256,
        group: 1,
        hw: 20,
        k: 3,
        stride: 2,
        pad: 1,
    },
    ConvCase {
        name: "mbv2_dw3x3_32_112",
        c: 32,
        m: 32,
        group: 32,
        hw: 112,
        k: 3,
        stride: 1,
        pad: 1,
    },
    ConvCase {
        name: "mbv2_dw3x3s2_96_112to56",
        c: 96,
        m: 96,
        group: 96,
        hw: 112,
        k: 3,
        stride: 2,
        pad: 1,
    },
    ConvCase {
        name: "mbv2_dw3x3_144_56",
        c: 144,
        m: 144,
        group: 144,
        hw: 56,
        k: 3,
        stride: 1,
        pad: 1,
    },
    ConvCase {
        name: "mbv2_dw3x3_960_7",
        c: 960,
        m: 960,
        group: 960,
        hw: 7,
        k: 3,
        stride: 1,
        pad: 1,
    },
    // MobileNetV2 stem: 3x3/2, 3->32, 224 -> 112 (the few-channel direct kernel).
    ConvCase {
        name: "mbv2_stem_3x3s2_3to32_224",
        c: 3,
        m: 32,
        group: 1,
        hw: 224,
        k: 3,
        stride: 2,
        pad: 1,
    },
    // YOLOv8n's first downsampler: 3x3/2, 16->32, 160 -> 80 (tuning
    // picks the channels-in-lanes direct kernel on AVX-512).
    ConvCase {
        name: "yolov8n_3x3s2_16to32_160",
        c: 16,
        m: 32,
        group: 1,
        hw: 160,
        k: 3,
        stride: 2,
        pad: 1,
    },
    // MobileNetV2 pointwise projection.
    ConvCase {
        name: "mbv2_pw_32to16_112",
        c: 32,
        m: 16,
        group: 1,
        hw: 112,
        k: 1,
        stride: 1,
        pad: 0,
    },
];

impl ConvCase {
    fn out_hw(&self) -> usize {
        (self.hw + 2 * self.pad - self.k) / self.stride + 1
    }

    fn flops(&self) -> u64 {
        let oh = self.out_hw();
        2 * (self.m * (self.c / self.group) * self.k * self.k * oh * oh) as u64
    }

    fn op(&self) -> Op {
        Op::Conv(ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![],
            group: self.group,
            kernel_shape: vec![self.k, self.k],
            pads: vec![self.pad; 4],
            strides: vec![self.stride; 2],
        })
    }
}

/// Deterministic values in [-0.6, 0.6].
fn data(len: usize, mul: usize, modulus: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * mul % modulus) as f32 - (modulus / 2) as f32) * 0.1)
        .collect()
}

fn tensor(shape: &[usize], mul: usize, modulus: usize) -> Tensor {
    let len = shape.iter().product();
    Tensor::from_vec(shape.to_vec(), data(len, mul, modulus)).expect("benchmark tensor")
}

fn conv(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("building a rayon pool for the benchmark");
    let mut group = c.benchmark_group("conv_t2");
    group
        .sample_size(10)
        .nresamples(10_000)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for case in CASES {
        let x = tensor(&[1, case.c, case.hw, case.hw], 7, 13);
        let w = tensor(&[case.m, case.c / case.group, case.k, case.k], 5, 11);
        let b = tensor(&[case.m], 3, 7);
        let op = case.op();
        group.throughput(Throughput::Elements(case.flops()));

        let inputs = [Some(&x), Some(&w), Some(&b)];
        // Fail loudly here, not as a panic inside the timing loop.
        run_op(&op, &inputs, 1).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        group.bench_function(BenchmarkId::new("run_op", case.name), |bch| {
            bch.iter(|| pool.install(|| black_box(run_op(&op, &inputs, 1))))
        });

        // W is a graph constant; the runtime prepares it once, knowing the
        // output shape.
        let out = run_op(&op, &inputs, 1).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let hint: Vec<Option<usize>> = out[0].shape().iter().map(|&d| Some(d)).collect();
        if let Some(prepared) = prepare(&op, &[None, Some(&w), None], Some(&hint)) {
            // As the runtime may after preparing: the packed W is not passed.
            let inputs = [Some(&x), None, Some(&b)];
            prepared
                .run(&inputs, 1)
                .unwrap_or_else(|e| panic!("{} prepared: {e}", case.name));
            group.bench_function(BenchmarkId::new("prepared", case.name), |bch| {
                bch.iter(|| pool.install(|| black_box(prepared.run(&inputs, 1))))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, conv);
criterion_main!(benches);
