//! Every kernel (forced through `sgemm_with`) against `sgemm_reference` on
//! edge-case and random shapes, layouts, packings, scalars, thread counts.

use super::*;
use crate::driver::blocking;
use crate::kernels::{available, selected};
use std::sync::atomic::{AtomicU32, Ordering};

/// Deterministic values in [-1, 1) (an LCG; no dependency needed).
fn rand_vec(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("test thread pool")
}

/// How an operand is handed to `sgemm`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    RowMajor,
    /// Stored transposed, passed as a `.t()` view (col_stride != 1).
    Transposed,
    /// A strided sub-view: row stride padded, every other column.
    Strided,
    /// Rows padded (stride `cols + 5`), unit column stride: the layout a
    /// thin product reads in place.
    Padded,
    Packed,
    /// Packed by the caller through a `Panels` fill function.
    Panels,
}

const LAYOUTS: [Layout; 6] = [
    Layout::RowMajor,
    Layout::Transposed,
    Layout::Strided,
    Layout::Padded,
    Layout::Packed,
    Layout::Panels,
];

/// Storage for a `rows x cols` operand in one of the layouts; `vals` row-major.
struct Operand {
    store: Vec<f32>,
    rows: usize,
    cols: usize,
    layout: Layout,
}

impl Operand {
    fn new(vals: &[f32], rows: usize, cols: usize, layout: Layout) -> Operand {
        let store = match layout {
            Layout::RowMajor | Layout::Packed | Layout::Panels => vals.to_vec(),
            Layout::Transposed => {
                let mut t = vec![0.0; rows * cols];
                for i in 0..rows {
                    for j in 0..cols {
                        t[j * rows + i] = vals[i * cols + j];
                    }
                }
                t
            }
            Layout::Strided => {
                // Element (i, j) at i * (2*cols + 3) + 2*j; gaps hold NaN so a
                // wrong index shows.
                let rs = 2 * cols + 3;
                let mut s = vec![f32::NAN; rows * rs + 1];
                for i in 0..rows {
                    for j in 0..cols {
                        s[i * rs + 2 * j] = vals[i * cols + j];
                    }
                }
                s
            }
            Layout::Padded => {
                let rs = cols + 5;
                let mut s = vec![f32::NAN; rows * rs];
                for i in 0..rows {
                    s[i * rs..i * rs + cols].copy_from_slice(&vals[i * cols..(i + 1) * cols]);
                }
                s
            }
        };
        Operand {
            store,
            rows,
            cols,
            layout,
        }
    }

    fn view(&self) -> MatRef<'_> {
        let (r, c) = (self.rows, self.cols);
        match self.layout {
            Layout::RowMajor | Layout::Packed | Layout::Panels => {
                MatRef::row_major(&self.store, r, c)
            }
            Layout::Transposed => MatRef::row_major(&self.store, c, r).t(),
            Layout::Strided => MatRef::new(&self.store, r, c, 2 * c + 3, 2),
            Layout::Padded => MatRef::new(&self.store, r, c, c + 5, 1),
        }
    }
}

/// One product checked against the reference. Returns nothing; panics on mismatch.
#[allow(clippy::too_many_arguments)]
fn check_case(
    kernel: &'static Kernel,
    (m, k, n): (usize, usize, usize),
    (la, lb): (Layout, Layout),
    alpha: f32,
    beta: f32,
    ldc: usize,
    with_epilogue: bool,
    seed: u64,
) {
    let ctx = format!(
        "{} m={m} k={k} n={n} A={la:?} B={lb:?} alpha={alpha} beta={beta} ldc={ldc} epi={with_epilogue}",
        kernel.name
    );
    let av = rand_vec(m * k, seed);
    let bv = rand_vec(k * n, seed + 1);
    let a_op = Operand::new(&av, m, k, la);
    let b_op = Operand::new(&bv, k, n, lb);
    let pa = PackedA::for_kernel(kernel, a_op.view());
    let pb = PackedB::for_kernel(kernel, b_op.view());
    // Panel fills that write every element, padding included (NaN first, so
    // a skipped element would show).
    let (av_view, bv_view) = (a_op.view(), b_op.view());
    let fill_a = |i0: usize, w: usize, panel: &mut [f32]| {
        panel.fill(f32::NAN);
        for p in 0..k {
            for r in 0..w {
                panel[p * w + r] = if i0 + r < m {
                    av_view.at(i0 + r, p)
                } else {
                    0.0
                };
            }
        }
    };
    let fill_b = |j0: usize, w: usize, panel: &mut [f32]| {
        panel.fill(f32::NAN);
        for p in 0..k {
            for c in 0..w {
                panel[p * w + c] = if j0 + c < n {
                    bv_view.at(p, j0 + c)
                } else {
                    0.0
                };
            }
        }
    };
    let a = match la {
        Layout::Packed => Lhs::Packed(&pa),
        Layout::Panels => Lhs::Panels(Panels {
            rows: m,
            cols: k,
            fill: &fill_a,
        }),
        _ => Lhs::Mat(a_op.view()),
    };
    let b = match lb {
        Layout::Packed => Rhs::Packed(&pb),
        Layout::Panels => Rhs::Panels(Panels {
            rows: k,
            cols: n,
            fill: &fill_b,
        }),
        _ => Rhs::Mat(b_op.view()),
    };
    let c_len = if m == 0 { 0 } else { (m - 1) * ldc + n };
    let mut c0 = rand_vec(c_len, seed + 2);
    if beta == 0.0 {
        // beta == 0 must ignore C entirely, NaN included.
        for (i, v) in c0.iter_mut().enumerate() {
            if i % 3 == 0 {
                *v = f32::NAN;
            }
        }
    }
    // Padding between rows gets a sentinel that must survive.
    for i in 0..m {
        for j in n..ldc {
            if i * ldc + j < c_len {
                c0[i * ldc + j] = 1234.5;
            }
        }
    }
    let bias = rand_vec(n, seed + 3);
    // With an epilogue, the seed's bits pick the in-register finish too:
    // row bias, column bias, residual, clamp, and whether the general
    // callback runs after it (it always does when the finish is empty).
    let row_bias = rand_vec(m, seed + 4);
    let ldr = n + 2;
    let res = rand_vec(m * ldr, seed + 5);
    let finish = if with_epilogue {
        Finish {
            row_bias: (seed & 1 != 0).then_some(&row_bias[..]),
            col_bias: (seed & 2 != 0).then_some(&bias[..]),
            residual: (seed & 4 != 0).then_some(Residual {
                data: &res,
                ld: ldr,
            }),
            // Relu's (0, inf) takes the kernels' branch without the top clamp.
            clamp: (seed & 8 != 0).then_some(if seed & 32 != 0 {
                (0.0, f32::INFINITY)
            } else {
                (-0.3, 0.5)
            }),
            stream: seed & 64 != 0,
        }
    } else {
        Finish {
            stream: seed & 64 != 0,
            ..Finish::default()
        }
    };
    let callback = with_epilogue && (finish.is_none() || seed & 16 != 0);
    let seen: Vec<AtomicU32> = (0..m * n).map(|_| AtomicU32::new(0)).collect();
    let epi = |row: usize, col0: usize, vals: &mut [f32]| {
        for (j, v) in vals.iter_mut().enumerate() {
            seen[row * n + col0 + j].fetch_add(1, Ordering::Relaxed);
            *v = (*v + bias[col0 + j]).max(0.0);
        }
    };
    let epi_ref = |row: usize, col0: usize, vals: &mut [f32]| {
        finish.apply(row, col0, vals);
        if callback {
            for (j, v) in vals.iter_mut().enumerate() {
                *v = (*v + bias[col0 + j]).max(0.0);
            }
        }
    };
    let mut got = c0.clone();
    sgemm_with(
        kernel,
        alpha,
        a,
        b,
        beta,
        &mut got,
        ldc,
        &finish,
        if callback { Some(&epi) } else { None },
    );
    let mut want = c0.clone();
    sgemm_reference(
        alpha,
        Lhs::Mat(a_op.view()),
        Rhs::Mat(b_op.view()),
        beta,
        &mut want,
        ldc,
        if with_epilogue { Some(&epi_ref) } else { None },
    );
    // Error bound: f32 accumulation of k products, relative to sum |a||b|.
    let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
    let (aa, ba) = (abs(&av), abs(&bv));
    let mut bound = abs(&c0)
        .iter()
        .map(|x| if x.is_nan() { 0.0 } else { *x })
        .collect::<Vec<_>>();
    sgemm_reference(
        alpha.abs(),
        Lhs::Mat(MatRef::row_major(&aa, m, k)),
        Rhs::Mat(MatRef::row_major(&ba, k, n)),
        if beta == 0.0 { 0.0 } else { beta.abs() },
        &mut bound,
        ldc,
        None,
    );
    for i in 0..m {
        for j in 0..n {
            let (g, w) = (got[i * ldc + j], want[i * ldc + j]);
            // The epilogue's adds round relative to what they add too.
            let mut scale = bound[i * ldc + j];
            if callback || finish.col_bias.is_some() {
                scale += bias[j].abs();
            }
            if finish.row_bias.is_some() {
                scale += row_bias[i].abs();
            }
            if finish.residual.is_some() {
                scale += res[i * ldr + j].abs();
            }
            let tol = (k as f32 + 4.0) * f32::EPSILON * scale + 1e-30;
            assert!(
                !g.is_nan() && (g - w).abs() <= tol,
                "{ctx}: C[{i},{j}] = {g}, want {w} (tol {tol})"
            );
        }
        for j in n..ldc {
            if i * ldc + j < c_len {
                assert_eq!(
                    got[i * ldc + j],
                    1234.5,
                    "{ctx}: padding C[{i},{j}] written"
                );
            }
        }
    }
    if callback {
        for (idx, s) in seen.iter().enumerate() {
            let s = s.load(Ordering::Relaxed);
            assert_eq!(
                s,
                1,
                "{ctx}: epilogue saw C[{},{}] {s} times",
                idx / n,
                idx % n
            );
        }
    }
}

/// `A·B` of row-major `av` (`m x k`) and `bv` (`k x n`) by the reference,
/// into a C of rows `ldc` apart (zeros between them), `epi` applied.
fn reference_product(
    av: &[f32],
    bv: &[f32],
    (m, k, n): (usize, usize, usize),
    ldc: usize,
    epi: Option<&Epilogue<'_>>,
) -> Vec<f32> {
    let mut c = vec![0.0f32; (m - 1) * ldc + n];
    sgemm_reference(
        1.0,
        Lhs::Mat(MatRef::row_major(av, m, k)),
        Rhs::Mat(MatRef::row_major(bv, k, n)),
        0.0,
        &mut c,
        ldc,
        epi,
    );
    c
}

/// Streamed stores write every float of C exactly as plain stores would,
/// whatever the offset of C's rows in their cache lines (the AVX-512 kernel
/// streams the full tiles of line-aligned rows, one of the 16 offsets here
/// when rows are 16 floats apart), and nothing around them.
#[test]
fn streamed_stores_match_reference_at_every_line_offset() {
    let (m, k, n) = (7, 5, 3 * 64 + 8);
    let av = rand_vec(m * k, 1);
    let bv = rand_vec(k * n, 2);
    let bias = rand_vec(m, 3);
    // Rows a multiple of 16 floats apart, and rows at varying offsets.
    for ldc in [n.next_multiple_of(16) + 16, n + 3] {
        let relu_bias = |row: usize, _col0: usize, vals: &mut [f32]| {
            vals.iter_mut().for_each(|v| *v = (*v + bias[row]).max(0.0))
        };
        let want = reference_product(&av, &bv, (m, k, n), ldc, Some(&relu_bias));
        for kernel in crate::kernels::available() {
            for off in 0..16 {
                let mut buf = vec![-7.0f32; off + want.len() + 16];
                let finish = Finish {
                    row_bias: Some(&bias),
                    clamp: Some((0.0, f32::INFINITY)),
                    stream: true,
                    ..Finish::default()
                };
                sgemm_with(
                    kernel,
                    1.0,
                    Lhs::Mat(MatRef::row_major(&av, m, k)),
                    Rhs::Mat(MatRef::row_major(&bv, k, n)),
                    0.0,
                    &mut buf[off..off + want.len()],
                    ldc,
                    &finish,
                    None,
                );
                let ctx = format!("{} ldc {ldc} offset {off}", kernel.name);
                assert!(
                    buf[..off].iter().all(|&v| v == -7.0),
                    "{ctx}: wrote before C"
                );
                assert!(
                    buf[off + want.len()..].iter().all(|&v| v == -7.0),
                    "{ctx}: wrote after C"
                );
                for (idx, (&got, &w)) in buf[off..].iter().zip(&want).enumerate() {
                    let (i, j) = (idx / ldc, idx % ldc);
                    if j < n {
                        assert!(
                            (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{ctx}: C[{i},{j}] = {got}, want {w}"
                        );
                    } else {
                        assert_eq!(got, -7.0, "{ctx}: padding C[{i},{j}] written");
                    }
                }
            }
        }
    }
}

/// Edge-case dimensions for one kernel: around MR, NR, the most k per block
/// (kc + 1 runs as two even blocks) and the task block.
fn edge_dims(kernel: &Kernel) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let blk = blocking(kernel);
    let (mr, nr, kc) = (kernel.mr, kernel.nr, blk.kc);
    let mc = blk.mcb * mr;
    let ms = vec![1, 2, mr - 1, mr, mr + 1, 2 * mc + 3];
    let ns = vec![1, 2, nr - 1, nr, nr + 1, 3 * nr + 5];
    let ks = vec![1, 2, 7, kc - 1, kc, kc + 1];
    (ms, ns, ks)
}

/// Runs the full edge-case grid for `kernel`: every (m, k, n) combination, with
/// layouts, scalars, ldc, epilogue and thread count rotating across cases so
/// each appears with many shapes.
fn edge_grid(kernel: &'static Kernel) {
    let (ms, ns, ks) = edge_dims(kernel);
    let scalars = [(1.0, 0.0), (0.5, 2.0), (-1.5, 1.0), (1.0, -0.25)];
    let pools = [pool(1), pool(2)];
    let mut case = 0u64;
    for &m in &ms {
        for &k in &ks {
            for &n in &ns {
                let nl = LAYOUTS.len() as u64;
                let la = LAYOUTS[(case % nl) as usize];
                let lb = LAYOUTS[((case / nl + case) % nl) as usize];
                let (alpha, beta) = scalars[((case / 3) % 4) as usize];
                let ldc = if case % 2 == 0 { n } else { n + 3 };
                let epi = case % 5 != 0;
                pools[(case % 2) as usize].install(|| {
                    check_case(kernel, (m, k, n), (la, lb), alpha, beta, ldc, epi, case)
                });
                case += 1;
            }
        }
    }
}

#[test]
fn portable_kernel_matches_reference_on_edge_grid() {
    edge_grid(kernels::portable());
}

#[test]
fn avx2_kernel_matches_reference_on_edge_grid() {
    match kernels::avx2() {
        Some(k) => edge_grid(k),
        None => eprintln!("AVX2+FMA not available on this CPU: kernel not tested here"),
    }
}

#[test]
fn avx512_kernel_matches_reference_on_edge_grid() {
    match kernels::avx512() {
        Some(k) => edge_grid(k),
        None => eprintln!("AVX-512F not available on this CPU: kernel not tested here"),
    }
}

#[test]
fn every_layout_pair_and_thread_count_matches_reference() {
    // All 25 layout pairs on shapes that take the parallel GEMM path (cut
    // by rows or by columns first), both
    // GEMV paths and the dot path, with each kernel.
    // (40 x 200 x 700: few row panels, many columns, the shape whose task
    // grid is cut along columns first; checked for values, not the order.)
    let shapes = [
        (37, 45, 131),
        (130, 200, 70),
        (40, 200, 700),
        (1, 300, 517),
        (300, 129, 1),
        (1, 77, 1),
    ];
    for kernel in available() {
        for threads in [1, 2] {
            let p = pool(threads);
            for (s, &shape) in shapes.iter().enumerate() {
                for (x, &la) in LAYOUTS.iter().enumerate() {
                    for (y, &lb) in LAYOUTS.iter().enumerate() {
                        let seed = (s * 25 + x * 5 + y) as u64;
                        let beta = if seed % 2 == 0 { 0.0 } else { 0.75 };
                        p.install(|| {
                            check_case(kernel, shape, (la, lb), 1.25, beta, shape.2 + 1, true, seed)
                        });
                    }
                }
            }
        }
    }
}

#[test]
fn random_shapes_match_reference() {
    let mut r = rand_vec(4000, 99)
        .into_iter()
        .map(|x| ((x + 1.0) * 1e6) as usize);
    let mut next = |max: usize| r.next().expect("enough random numbers") % max;
    for kernel in available() {
        for case in 0..25u64 {
            let (m, k, n) = (next(150), next(300), next(170));
            let la = LAYOUTS[next(LAYOUTS.len())];
            let lb = LAYOUTS[next(LAYOUTS.len())];
            let ldc = n + next(3);
            let threads = 1 + next(2);
            pool(threads).install(|| {
                check_case(
                    kernel,
                    (m, k, n),
                    (la, lb),
                    0.7,
                    1.5,
                    ldc,
                    case % 2 == 0,
                    case,
                )
            });
        }
    }
}

/// Every (m, n, k) of the grid, with B row-major (tight: its last row ends
/// where the buffer does) and padded, against the reference on 1 and 2
/// threads, with and without an epilogue; first asserting that B is read
/// in place where `in_place(kernel, m)` says it must be.
fn check_b_in_place_grid(
    ms: &[usize],
    ns: impl Fn(usize) -> Vec<usize>,
    ks: &[usize],
    in_place: impl Fn(&Kernel, usize) -> bool,
) {
    for kernel in available() {
        let mut case = 0;
        for &m in ms {
            for n in ns(kernel.nr) {
                for &k in ks {
                    for lb in [Layout::RowMajor, Layout::Padded] {
                        let view = Operand {
                            store: vec![0.0; k * (n + 5)],
                            rows: k,
                            cols: n,
                            layout: lb,
                        };
                        if in_place(kernel, m) {
                            assert!(
                                crate::direct_b_applies(kernel, m, view.view()),
                                "{} m={m} n={n} k={k} {lb:?} is not read in place",
                                kernel.name
                            );
                        }
                        case += 1;
                        pool(1 + case % 2).install(|| {
                            check_case(
                                kernel,
                                (m, k, n),
                                (Layout::Packed, lb),
                                1.0,
                                if case % 3 == 0 { 0.5 } else { 0.0 },
                                n + 2,
                                case % 2 == 0,
                                case as u64,
                            )
                        });
                    }
                }
            }
        }
    }
}

/// Thin products read a row-major B in place (full panels straight from B,
/// the partial last one packed, or read in place too by a kernel that
/// loads only its live columns): column counts with and without a partial
/// panel, depths across several k blocks.
#[test]
fn direct_b_matches_reference() {
    check_b_in_place_grid(
        &[1, 5, 6, 7, 24, 64],
        |nr| vec![nr, nr + 1, 2 * nr + 13, 3 * nr],
        &[1, 7, 700, 2100],
        |_, m| m > 1,
    );
}

/// A B small enough to stay in L2 is read whole in place, partial panel
/// included, for any number of rows of C, by a kernel that loads only a
/// partial tile's live columns (and packed by the others): column counts
/// below, at and past one panel (MobileNetV2's 7x7 planes: 49).
#[test]
fn small_b_read_whole_in_place_matches_reference() {
    check_b_in_place_grid(
        &[7, 65, 160],
        |nr| vec![1, 13, 49, nr, nr + 3],
        &[1, 9, 960],
        |kernel, _| kernel.partial_b_in_place,
    );
}

#[test]
fn zero_sized_dims() {
    for kernel in available() {
        for (m, k, n) in [
            (0, 4, 4),
            (4, 0, 4),
            (4, 4, 0),
            (0, 0, 0),
            (3, 0, 1),
            (1, 0, 5),
        ] {
            for beta in [0.0, 2.0] {
                check_case(
                    kernel,
                    (m, k, n),
                    (Layout::RowMajor, Layout::Packed),
                    1.0,
                    beta,
                    n + 1,
                    true,
                    7,
                );
            }
        }
    }
}

#[test]
fn nested_calls_inside_par_iter() {
    use rayon::prelude::*;
    let (m, k, n) = (64, 96, 80);
    let av = rand_vec(m * k, 11);
    let bv = rand_vec(k * n, 12);
    let want = reference_product(&av, &bv, (m, k, n), n, None);
    let outs: Vec<Vec<f32>> = pool(2).install(|| {
        (0..6)
            .into_par_iter()
            .map(|_| {
                let mut c = vec![f32::NAN; m * n];
                sgemm(
                    1.0,
                    Lhs::Mat(MatRef::row_major(&av, m, k)),
                    Rhs::Mat(MatRef::row_major(&bv, k, n)),
                    0.0,
                    &mut c,
                    n,
                    None,
                );
                c
            })
            .collect()
    });
    for c in outs {
        for (g, w) in c.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4, "{g} vs {w}");
        }
    }
}

#[test]
fn operands_packed_for_another_kernel_still_work() {
    // PackedA for the portable kernel with PackedB for the selected one: sgemm
    // follows A's kernel and repacks B.
    let (m, k, n) = (20, 33, 40);
    let av = rand_vec(m * k, 21);
    let bv = rand_vec(k * n, 22);
    let a = MatRef::row_major(&av, m, k);
    let b = MatRef::row_major(&bv, k, n);
    let pa = PackedA::for_kernel(kernels::portable(), a);
    let pb = PackedB::for_kernel(selected(), b);
    let mut want = vec![0.0; m * n];
    sgemm_reference(1.0, Lhs::Mat(a), Rhs::Mat(b), 0.0, &mut want, n, None);
    for (la, rb) in [
        (Lhs::Packed(&pa), Rhs::Packed(&pb)),
        (Lhs::Mat(a), Rhs::Packed(&pb)),
        (Lhs::Packed(&pa), Rhs::Mat(b)),
    ] {
        let mut c = vec![0.0; m * n];
        sgemm(1.0, la, rb, 0.0, &mut c, n, None);
        for (g, w) in c.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4, "{g} vs {w}");
        }
    }
}

#[test]
fn packed_operands_round_trip() {
    let (r, c) = (13, 70);
    let v = rand_vec(r * c, 31);
    for kernel in available() {
        let pa = PackedA::for_kernel(kernel, MatRef::row_major(&v, r, c));
        let pb = PackedB::for_kernel(kernel, MatRef::row_major(&v, r, c));
        assert_eq!(pa.to_row_major(), v, "{}", kernel.name);
        assert_eq!(pb.to_row_major(), v, "{}", kernel.name);
        assert_eq!((pa.rows(), pa.cols(), pb.rows(), pb.cols()), (r, c, r, c));
    }
}

#[test]
fn packed_b_columns() {
    // k x n with a partial last panel for every kernel's nr.
    let (k, n) = (19, 150);
    let v = rand_vec(k * n, 33);
    // d = v^T, row-major n x k.
    let d: Vec<f32> = (0..n * k).map(|e| v[(e % k) * n + e / k]).collect();
    for kernel in available() {
        let pb = PackedB::for_kernel(kernel, MatRef::row_major(&v, k, n));
        let mut col = vec![0.0; k];
        for j in [0, 1, kernel.nr - 1, kernel.nr, n - 1] {
            pb.column_into(j, &mut col);
            assert_eq!(col, d[j * k..(j + 1) * k], "{} column {j}", kernel.name);
        }
    }
}

#[test]
fn nan_and_inf_in_operands_propagate_like_the_reference() {
    let (m, k, n) = (9, 20, 70);
    let mut av = rand_vec(m * k, 41);
    av[2 * k + 5] = f32::NAN; // row 2 becomes NaN
    av[6 * k + 1] = f32::INFINITY; // row 6 becomes +-inf (or NaN)
    let bv = rand_vec(k * n, 42);
    // The in-register clamp lets NaN through and clamps infinities, like the
    // scalar definition.
    let clamps = [None, Some((0.0, 6.0)), Some((0.0, f32::INFINITY))];
    for (kernel, clamp) in available().into_iter().flat_map(|k| clamps.map(|c| (k, c))) {
        let finish = Finish {
            clamp,
            ..Finish::default()
        };
        let mut got = vec![0.0; m * n];
        let mut want = vec![0.0; m * n];
        let a = MatRef::row_major(&av, m, k);
        let b = MatRef::row_major(&bv, k, n);
        sgemm_with(
            kernel,
            1.0,
            Lhs::Mat(a),
            Rhs::Mat(b),
            0.0,
            &mut got,
            n,
            &finish,
            None,
        );
        let finish_ref = |i: usize, j0: usize, v: &mut [f32]| finish.apply(i, j0, v);
        sgemm_reference(
            1.0,
            Lhs::Mat(a),
            Rhs::Mat(b),
            0.0,
            &mut want,
            n,
            Some(&finish_ref),
        );
        assert!(clamp.is_none() || want.iter().any(|v| v.is_nan()));
        for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
            let ok = if w.is_finite() {
                (g - w).abs() <= 1e-4
            } else {
                g.is_nan() == w.is_nan() && (w.is_nan() || g == w)
            };
            assert!(ok, "{} [{idx}]: {g} vs {w}", kernel.name);
        }
    }
}

#[test]
fn selected_kernel_is_the_best_available() {
    let name = selected_kernel();
    assert!(available().iter().any(|k| k.name == name));
    if std::env::var("KILN_GEMM_KERNEL").is_err() {
        assert_eq!(
            name,
            available().last().expect("portable always there").name
        );
    }
}

#[test]
fn finish_definition_hand_checked() {
    // Order: row bias, column bias, residual, then the clamp.
    let row_bias = [10.0, -10.0];
    let col_bias = [1.0, 2.0, 3.0];
    let res = [0.5, 0.25, -100.0, 9.0, 0.0, 0.0, 1.0, 1.0];
    let f = Finish {
        row_bias: Some(&row_bias),
        col_bias: Some(&col_bias),
        residual: Some(Residual { data: &res, ld: 4 }),
        clamp: Some((-5.0, 12.0)),
        stream: false,
    };
    let mut row1 = [0.0, f32::NAN, 20.0];
    f.apply(1, 0, &mut row1);
    // -10 + 1 + 0 = -9 -> -5; NaN passes; -10 + 3 + 1 + 20 = 14 -> 12.
    assert_eq!(row1[0], -5.0);
    assert!(row1[1].is_nan());
    assert_eq!(row1[2], 12.0);
    let mut piece = [1.0];
    f.apply(0, 2, &mut piece); // 1 + 10 + 3 - 100 = -86 -> -5
    assert_eq!(piece, [-5.0]);
    // Relu keeps -0.0; lo > hi gives hi, as the Clip op does.
    let relu = Finish {
        clamp: Some((0.0, f32::INFINITY)),
        ..Finish::default()
    };
    let mut v = [-0.0f32, -3.0, 2.0];
    relu.apply(0, 0, &mut v);
    assert!(v[0] == 0.0 && v[0].is_sign_negative() && v[1] == 0.0 && v[2] == 2.0);
    let odd = Finish {
        clamp: Some((3.0, 1.0)),
        ..Finish::default()
    };
    let mut v = [0.0f32, 2.0, 5.0];
    odd.apply(0, 0, &mut v);
    assert_eq!(v, [1.0, 1.0, 1.0]);
    assert!(Finish::default().is_none() && !relu.is_none());
}

/// The kernels that can read A's rows in place get row-major and padded A
/// that way (so the random-shape tests above run that path on them), and
/// never a transposed or column-strided one.
#[test]
fn a_read_in_place_only_with_unit_column_stride() {
    for kernel in crate::kernels::available() {
        for layout in [
            Layout::RowMajor,
            Layout::Padded,
            Layout::Transposed,
            Layout::Strided,
        ] {
            let op = Operand::new(&[1.0; 35], 5, 7, layout);
            let in_place = crate::a_in_place_applies(kernel, op.view());
            let contiguous = matches!(layout, Layout::RowMajor | Layout::Padded);
            assert_eq!(
                in_place,
                kernel.reads_a_in_place && contiguous,
                "{kernel:?} {layout:?}"
            );
        }
    }
}

/// A gathered A (segments from anywhere in one slice, some all zeros)
/// against the reference on its dense form, on every kernel (those that
/// read A in place read the segments where they lie; the others pack),
/// B packed and row-major, 1 and 2 threads, with a finish. Segment lengths
/// cover one float, a partial vector, and more than a k block, so blocks
/// are cut at segment ends and past the zero segment's length.
#[test]
fn gathered_a_matches_reference() {
    let mut r = rand_vec(4000, 7)
        .into_iter()
        .map(|x| ((x + 1.0) * 1e6) as usize);
    let mut next = |max: usize| r.next().expect("enough random numbers") % max;
    // (rows per image, segments, segment length, n, images)
    let shapes = [
        (1, 1, 1, 1, 1),
        (7, 9, 3, 70, 2),
        (13, 9, 64, 130, 1),
        (50, 4, 17, 65, 3),
        (6, 2, 1100, 40, 1),
        (31, 1, 300, 129, 2),
    ];
    for kernel in available() {
        for (case, &(per, segs, seg_len, n, images)) in shapes.iter().enumerate() {
            let stride = 5000.max(2 * seg_len);
            let data = rand_vec(stride * images, case as u64);
            let offsets: Vec<usize> = (0..per * segs)
                .map(|_| {
                    if next(5) == 0 {
                        GATHER_ZEROS
                    } else {
                        next(stride - seg_len + 1)
                    }
                })
                .collect();
            let m = per * images;
            let table = GatherTable::new(offsets, segs);
            let g = Gather {
                data: &data,
                table: &table,
                seg_len,
                images,
                image_stride: stride,
            };
            let k = segs * seg_len;
            let dense = g.to_row_major();
            let bv = rand_vec(k * n, case as u64 + 100);
            let bias = rand_vec(n, case as u64 + 200);
            let fin = Finish {
                col_bias: Some(&bias),
                clamp: Some((-0.5, 0.5)),
                ..Finish::default()
            };
            let mut want = reference_product(&dense, &bv, (m, k, n), n, None);
            for (i, row) in want.chunks_exact_mut(n).enumerate() {
                fin.apply(i, 0, row);
            }
            let pb = PackedB::for_kernel(kernel, MatRef::row_major(&bv, k, n));
            for (threads, packed) in [(1, false), (2, true), (2, false)] {
                let b = if packed {
                    Rhs::Packed(&pb)
                } else {
                    Rhs::Mat(MatRef::row_major(&bv, k, n))
                };
                let mut c = vec![f32::NAN; m * n];
                pool(threads).install(|| {
                    sgemm_with(kernel, 1.0, Lhs::Gather(g), b, 0.0, &mut c, n, &fin, None)
                });
                for (j, (&got, &w)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        (got - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{} m={m} segs={segs} seg_len={seg_len} n={n} threads={threads} \
                         packed={packed}: C[{}, {}] = {got}, want {w}",
                        kernel.name,
                        j / n,
                        j % n
                    );
                }
            }
        }
    }
}

/// A gather whose segment runs past its slice is refused (a caller bug,
/// caught before any kernel reads out of bounds).
#[test]
#[should_panic(expected = "outside its")]
fn gathered_a_out_of_bounds_panics() {
    let data = vec![1.0f32; 10];
    let table = GatherTable::new(vec![0, GATHER_ZEROS, 6], 1);
    let g = Gather {
        data: &data,
        table: &table,
        seg_len: 4,
        images: 1,
        image_stride: 0,
    };
    // Each segment fits one image, but the second image's does not.
    let g = Gather {
        images: 2,
        image_stride: 2,
        ..g
    };
    let bv = vec![1.0f32; 4];
    let mut c = vec![0.0f32; 6];
    sgemm(
        1.0,
        Lhs::Gather(g),
        Rhs::Mat(MatRef::row_major(&bv, 4, 1)),
        0.0,
        &mut c,
        1,
        None,
    );
}

/// Products with a few column panels that fall in uneven blocks (the 9
/// panels of a 14x14 MobileNetV2 expansion, 196 x 96 x 576), which the
/// driver cuts one panel per block on 2 threads: every tile still written
/// once, with and without the epilogue.
#[test]
fn few_uneven_column_panels_match_reference() {
    let kernel = kernels::selected();
    let p = pool(2);
    for (case, &(m, k, n)) in [
        (196, 96, 576),
        (49, 576, 160),
        (392, 960, 320),
        (100, 64, 300),
    ]
    .iter()
    .enumerate()
    {
        let layouts = (LAYOUTS[case % 2], LAYOUTS[0]);
        let epi = case % 2 == 0;
        p.install(|| check_case(kernel, (m, k, n), layouts, 1.0, 0.0, n, epi, case as u64));
    }
}

/// A transposed view packed into B panels (16 x 16 blocks in registers on
/// AVX-512, the rest element by element) lands where the plain definition
/// puts it: every column count and depth around the block size, a
/// panel start past column 0, and column strides beyond the depth.
#[test]
fn transposed_b_panels_pack_like_the_definition() {
    for &(k, cols, nr, j0, extra) in &[
        (64, 64, 64, 0, 0),
        (64, 128, 64, 64, 704),
        (16, 16, 16, 0, 0),
        (17, 33, 64, 0, 3),
        (15, 70, 64, 0, 1),
        (33, 100, 64, 48, 5),
        (1, 5, 16, 2, 2),
        (48, 31, 16, 16, 9),
    ] {
        let cs = k + extra;
        let n = j0 + cols;
        // Column c's k values at c * cs (row stride 1), NaN in the gaps.
        let mut store = vec![f32::NAN; n * cs];
        for c in 0..n {
            for p in 0..k {
                store[c * cs + p] = (c * 1000 + p) as f32;
            }
        }
        let b = MatRef::new(&store, k, n, 1, cs);
        let mut got = vec![-1.0f32; nr * k];
        crate::pack::pack_b_panel(b, j0, nr, &mut got);
        for p in 0..k {
            for c in 0..nr {
                let want = if j0 + c < n {
                    ((j0 + c) * 1000 + p) as f32
                } else {
                    0.0
                };
                assert_eq!(
                    got[p * nr + c],
                    want,
                    "k {k} cols {cols} nr {nr} j0 {j0}: ({p}, {c})"
                );
            }
        }
    }
}

/// k blocks: as few as the limit allows, as even as multiples of 8 allow,
/// never over the limit, covering k.
#[test]
fn k_blocks_are_few_and_even() {
    use crate::driver::balanced_kc;
    assert_eq!(balanced_kc(1024, 768), 768);
    assert_eq!(balanced_kc(1024, 3072), 1024);
    assert_eq!(balanced_kc(1024, 1100), 552);
    assert_eq!(balanced_kc(1024, 27), 32);
    assert_eq!(balanced_kc(512, 768), 384);
    for max in [1usize, 7, 64, 500, 512, 1024] {
        for k in (1..5000).step_by(37) {
            let kc = balanced_kc(max, k);
            assert!(kc >= 1 && kc <= max, "max {max} k {k}: kc {kc}");
            assert_eq!(k.div_ceil(kc), k.div_ceil(max), "max {max} k {k}: kc {kc}");
        }
    }
}
