//! Steady-state runs make no large allocations: activations over
//! `kiln_cpu::buffers::MIN_BYTES` reuse the buffers earlier runs freed, so a
//! run neither maps fresh memory nor page-faults on it. Measured with a
//! counting global allocator (this test binary's only test, so no other test
//! allocates while it counts).
//!
//! Small allocations (shape vectors, the plan's bookkeeping, outputs under
//! 4 KiB or for which the pool holds no fitting buffer) still happen on
//! every run; this test does not claim otherwise.

use kiln_ir::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

mod common;
use common::{node, session, vi};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LARGE_ALLOCS: AtomicUsize = AtomicUsize::new(0);
static LARGE_BYTES: AtomicUsize = AtomicUsize::new(0);
const LARGE: usize = 1 << 20;

// SAFETY: forwards every call to the system allocator unchanged; the counters
// are atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            note(new_size);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size: usize) {
    if size >= LARGE && COUNTING.load(Ordering::Relaxed) {
        LARGE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        LARGE_BYTES.fetch_add(size, Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn weights(shape: &[usize], seed: u32) -> Arc<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 1000.0 - 0.5
        })
        .collect();
    Arc::new(Tensor::from_vec(shape.to_vec(), v).unwrap())
}

/// A small CNN whose activations are 4-16 MiB each: conv 3x3 -> reshape to
/// rows -> relu -> reshape back -> depthwise 3x3 -> 1x1 conv + residual add
/// -> global average pool. The reshapes are their inputs' last readers, so
/// they must move the buffers, not copy them.
fn cnn() -> Graph {
    let conv = |group: usize, k: usize| {
        Op::Conv(ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![],
            group,
            kernel_shape: vec![],
            pads: vec![k / 2; 4],
            strides: vec![],
        })
    };
    let mut g = Graph {
        inputs: vec![vi(
            "x",
            DType::F32,
            vec![
                Dim::named("N"),
                Dim::Known(8),
                Dim::Known(128),
                Dim::Known(128),
            ],
        )],
        outputs: vec![vi(
            "y",
            DType::F32,
            vec![
                Dim::named("N"),
                Dim::Known(32),
                Dim::Known(1),
                Dim::Known(1),
            ],
        )],
        nodes: vec![
            node("c1", conv(1, 3), &["x", "w1", "b1"], &["a"]),
            node(
                "rows",
                Op::Reshape { allowzero: false },
                &["a", "rows_shape"],
                &["a2"],
            ),
            node("r1", Op::Unary(UnaryOp::Relu), &["a2"], &["ar2"]),
            node(
                "planes",
                Op::Reshape { allowzero: false },
                &["ar2", "planes_shape"],
                &["ar"],
            ),
            node("dw", conv(32, 3), &["ar", "w2"], &["d"]),
            node("pw", conv(1, 1), &["d", "w3"], &["p"]),
            node("add", Op::Binary(BinaryOp::Add), &["p", "ar"], &["s"]),
            node("gap", Op::GlobalAveragePool, &["s"], &["y"]),
        ],
        ..Default::default()
    };
    g.initializers
        .insert("w1".into(), weights(&[32, 8, 3, 3], 1));
    g.initializers.insert("b1".into(), weights(&[32], 2));
    g.initializers
        .insert("w2".into(), weights(&[32, 1, 3, 3], 3));
    g.initializers
        .insert("w3".into(), weights(&[32, 32, 1, 1], 4));
    let shape = |v: Vec<i64>| Arc::new(Tensor::from_vec(vec![v.len()], v).unwrap());
    g.initializers
        .insert("rows_shape".into(), shape(vec![0, 32, -1]));
    g.initializers
        .insert("planes_shape".into(), shape(vec![0, 32, 128, 128]));
    g
}

#[test]
fn steady_state_runs_make_no_large_allocations() {
    let s = session(cnn()).unwrap();
    let x = || weights(&[2, 8, 128, 128], 9).as_ref().clone();
    let inputs: Vec<Tensor> = (0..10).map(|_| x()).collect();
    let mut inputs = inputs.into_iter();
    // Warm-up runs fill the buffer pool and the GEMM's per-thread packing
    // buffers (which worker runs a kernel varies from run to run).
    let first = s.run(vec![("x".into(), inputs.next().unwrap())]).unwrap();
    for _ in 0..3 {
        s.run(vec![("x".into(), inputs.next().unwrap())]).unwrap();
    }
    COUNTING.store(true, Ordering::SeqCst);
    let mut outs = Vec::new();
    for x in inputs {
        outs.push(s.run(vec![("x".into(), x)]).unwrap());
    }
    COUNTING.store(false, Ordering::SeqCst);
    let (n, bytes) = (
        LARGE_ALLOCS.load(Ordering::SeqCst),
        LARGE_BYTES.load(Ordering::SeqCst),
    );
    assert_eq!(
        (n, bytes),
        (0, 0),
        "6 steady-state runs made {n} allocations of >= 1 MiB ({bytes} bytes)"
    );
    // And they computed the same thing as the first run.
    for o in outs {
        assert_eq!(
            o[0].1.as_slice::<f32>().unwrap(),
            first[0].1.as_slice::<f32>().unwrap()
        );
    }
}
