//! Kernels specialized once, at plan time, on a node's constant inputs.
//!
//! The runtime calls [`prepare`] for each node while it builds its plan, with
//! the node's constant inputs (graph initializers). Where the op has weights
//! worth packing, it gets a [`PreparedOp`] that holds them in the layout the
//! GEMM microkernel reads, so no run repacks them:
//!
//! | op | constant | packed as |
//! |---|---|---|
//! | Conv, FusedConv (not depthwise) | f32 W | per group, `PackedA` of `W_g [M/group, C/group * k...]`, or `PackedB` of its transpose when the output planes are small (see `nn::conv::ConvPack`) |
//! | MatMul, FusedMatMul | f32 2-D B | `PackedB` of B |
//! | Gemm | f32 2-D B | `PackedB` of B' (B or B^T, per `transB`) |
//! | Gather (axis 0) | f32 2-D data D | nothing new: a MatMul/Gemm's `PackedB` that is bit for bit D^T ([`tied_table`], [`prepare_gather_from`]) |
//!
//! The last row is for tied embeddings (GPT-2's token table is also its LM
//! head, transposed): the table is kept once, in the head's panels, and the
//! lookup reads its rows from there.
//!
//! [`PreparedOp::run`] has `run_op`'s contract, except that the packed input
//! ([`PreparedOp::packed_input`]) may be absent: the op holds its data, so the
//! runtime can free the original constant. When it is given, it must have the
//! dtype and shape that was packed (it never computes with stale weights of
//! another shape). Other inputs that are not f32 take the unprepared kernel,
//! which needs the original W/B to be given.

use crate::nn::{self, MatmulB};
use crate::util::{broadcast_indices, broadcast_shape};
use crate::{fused, invalid};
use kiln_gemm::{MatRef, PackedB, Rhs};
use kiln_ir::{ConvAttrs, DType, FusedAct, FusedOp, Op, Tensor, TensorData};
use std::sync::Arc;

/// A node's kernel specialized once, at plan time, on its constant inputs
/// (packed weights).
pub struct PreparedOp {
    /// The op, for the unprepared fallback and error messages.
    op: Op,
    kind: Kind,
}

impl std::fmt::Debug for PreparedOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.kind {
            Kind::Conv {
                w_shape, packed, ..
            } => format!("W {w_shape:?} packed per group {}", packed.orientation()),
            Kind::MatMul { b_shape, .. } => format!("B {b_shape:?} packed"),
            Kind::Gemm { b_shape, .. } => format!("B {b_shape:?} packed"),
            Kind::Gather { table } => format!(
                "data [{}, {}] read from a product's packed B",
                table.cols(),
                table.rows()
            ),
            Kind::PointwiseDepthwise { pw: Some(pw), .. } => format!("pointwise conv {pw:?}"),
            Kind::PointwiseDepthwise { w1, .. } => {
                format!(
                    "pointwise W {:?} unpacked (the direct kernel's)",
                    w1.shape()
                )
            }
            Kind::DepthwiseNhwc { w, .. } => format!("W {:?} in vector lanes", w.shape()),
        };
        write!(f, "PreparedOp({}: {what})", self.op.name())
    }
}

enum Kind {
    /// Conv, FusedConv or (one group) FusedConvNhwc with W packed per group.
    Conv {
        attrs: ConvAttrs,
        /// `Some` for FusedConv and FusedConvNhwc.
        fused: Option<FusedAct>,
        /// FusedConvNhwc: X and Y channels-last.
        channels_last: bool,
        w_shape: Vec<usize>,
        packed: nn::ConvPack,
        /// Weights for Winograd, transformed at the first run whose output
        /// planes make it apply, when the plan could not see them (symbolic
        /// input sizes) and packed W for a GEMM; `None` when it saw them.
        late: Option<std::sync::OnceLock<Option<nn::ConvPack>>>,
        /// The strategy measured fastest on the first run (`tune.rs`), for
        /// runs on X of that run's shape. `None` when not tuned: tuning
        /// off, not a one-group 2-D conv, or planned as Winograd or
        /// channels-last.
        tuned: Option<Box<TunedSlot>>,
    },
    /// MatMul or FusedMatMul with a packed 2-D B.
    MatMul {
        fused: Option<FusedAct>,
        b_shape: Vec<usize>,
        packed: Arc<PackedB>,
    },
    /// Gemm with a packed B' (`transB` applied).
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        b_shape: Vec<usize>,
        packed: Arc<PackedB>,
    },
    /// Gather along axis 0 of a 2-D f32 table `D` that is held as the
    /// transpose `table` = D^T, shared with the product that packed it.
    Gather { table: Arc<PackedB> },
    /// FusedPointwiseDepthwise: its pointwise conv prepared (packed, and
    /// tuned on its first run; `None` for the few-channel ones the direct
    /// kernel runs unpacked), for runs the one kernel does not take; and
    /// the pointwise weights as given, for runs it does and that direct
    /// kernel. The two convs' ops are built here once; the one kernel's
    /// attributes are the node's own (`PreparedOp::op`).
    PointwiseDepthwise {
        w1: Tensor,
        pw: Option<Box<PreparedOp>>,
        pointwise: FusedOp,
        depthwise: FusedOp,
    },
    /// FusedConvNhwc of a depthwise conv: W as given (for the kernels other
    /// than AVX-512's and the NCHW route) and laid out in vector lanes for
    /// the AVX-512 one, once here rather than on every run.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    DepthwiseNhwc { w: Tensor, lanes: Vec<f32> },
}

/// Specializes `op` on its constant inputs. `constants[i]` is the input's
/// tensor when input i is a constant of the graph (same length as the node's
/// inputs). `out_shape` is the first output's shape as far as the plan knows
/// it (`None` per unknown dim); it only steers layout choices, never
/// correctness. Returns None when the op has nothing worth preparing (the
/// runtime then uses `run_op`).
pub fn prepare(
    op: &Op,
    constants: &[Option<&Tensor>],
    out_shape: Option<&[Option<usize>]>,
) -> Option<PreparedOp> {
    let f32_const = |i: usize| {
        constants
            .get(i)
            .copied()
            .flatten()
            .filter(|t| t.dtype() == DType::F32)
    };
    let kind = match op {
        Op::Conv(attrs) => prepare_conv(attrs, None, f32_const(1)?, out_shape)?,
        Op::Fused(FusedOp::Conv { conv, act }) => {
            prepare_conv(conv, Some(*act), f32_const(1)?, out_shape)?
        }
        // One group: the gathered product reads X channels-last as it is.
        // (Depthwise ones read W unpacked.)
        Op::Fused(FusedOp::ConvNhwc { conv, act }) if conv.group == 1 => {
            let w = f32_const(1)?;
            let ws = w.shape();
            if ws.len() < 3 || ws.contains(&0) {
                return None;
            }
            Kind::Conv {
                attrs: conv.clone(),
                fused: Some(*act),
                channels_last: true,
                late: Default::default(),
                tuned: None,
                w_shape: ws.to_vec(),
                packed: nn::pack_conv_weights_gathered(w.as_slice::<f32>()?, ws),
            }
        }
        // Depthwise: W in vector lanes for the AVX-512 kernel.
        #[cfg(target_arch = "x86_64")]
        Op::Fused(FusedOp::ConvNhwc { conv, .. }) if std::is_x86_feature_detected!("avx512f") => {
            let w = f32_const(1)?;
            let ws = w.shape();
            // [C, 1, kh, kw] with a group per channel.
            if ws.len() != 4 || ws[1] != 1 || ws[0] != conv.group || ws.contains(&0) {
                return None;
            }
            // Bigger kernels run through NCHW (see `nn::conv_nhwc`).
            if ws[2] * ws[3] > nn::MAX_NHWC_TAPS {
                return None;
            }
            Kind::DepthwiseNhwc {
                lanes: nn::depthwise_lane_weights(w.as_slice::<f32>()?, ws[0], ws[2] * ws[3]),
                w: w.clone(),
            }
        }
        Op::MatMul => prepare_matmul(None, f32_const(1)?)?,
        Op::Fused(FusedOp::MatMul { act }) => prepare_matmul(Some(*act), f32_const(1)?)?,
        Op::Fused(FusedOp::PointwiseDepthwise { pw_act, dw, act }) => {
            let w1 = f32_const(1)?;
            let pointwise = FusedOp::Conv {
                conv: fused::pointwise_attrs(w1.rank().checked_sub(2)?),
                act: *pw_act,
            };
            let pw = prepare(
                &Op::Fused(pointwise.clone()),
                &[None, Some(w1), constants.get(2).copied().flatten()],
                None,
            );
            Kind::PointwiseDepthwise {
                w1: w1.clone(),
                pw: pw.map(Box::new),
                pointwise,
                depthwise: FusedOp::Conv {
                    conv: dw.clone(),
                    act: *act,
                },
            }
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let b = f32_const(1)?;
            if b.rank() != 2 {
                return None;
            }
            let bv = b.as_slice::<f32>()?;
            let (r, c) = (b.shape()[0], b.shape()[1]);
            let view = MatRef::row_major(bv, r, c);
            let view = if *trans_b { view.t() } else { view };
            Kind::Gemm {
                alpha: *alpha,
                beta: *beta,
                trans_a: *trans_a,
                b_shape: b.shape().to_vec(),
                packed: Arc::new(PackedB::new(view)),
            }
        }
        _ => return None,
    };
    Some(PreparedOp {
        op: op.clone(),
        kind,
    })
}

fn prepare_conv(
    attrs: &ConvAttrs,
    fused: Option<FusedAct>,
    w: &Tensor,
    out_shape: Option<&[Option<usize>]>,
) -> Option<Kind> {
    let ws = w.shape();
    let (m, group) = (*ws.first()?, attrs.group);
    #[cfg(target_arch = "x86_64")]
    if nn::winograd_applies(
        ws,
        group,
        &attrs.strides,
        &attrs.dilations,
        out_hw(out_shape),
    ) {
        return Some(Kind::Conv {
            attrs: attrs.clone(),
            fused,
            channels_last: false,
            late: Default::default(),
            tuned: None,
            w_shape: ws.to_vec(),
            packed: nn::ConvPack::Winograd(nn::WinogradWeights::new(
                w.as_slice::<f32>()?,
                m,
                ws[1],
            )),
        });
    }
    if ws.len() < 3 || group == 0 || m == 0 || m % group != 0 || ws[1] == 0 || ws[2..].contains(&0)
    {
        // Invalid (run_op reports it) or empty.
        return None;
    }
    let wv = w.as_slice::<f32>()?;
    if nn::uses_direct_kernel(group, ws[1], &ws[2..], &attrs.strides, &attrs.dilations)
        || nn::many_channel_applies(
            ws[1],
            &ws[2..],
            &attrs.strides,
            &attrs.dilations,
            out_shape.and_then(|s| s.last().copied().flatten()),
        )
    {
        // A direct kernel's (depthwise, few channels, many on wide planes:
        // they read W unpacked): nothing to pack, unless tuning times it
        // against the GEMMs.
        return tunable(attrs, ws).then(|| Kind::Conv {
            attrs: attrs.clone(),
            fused,
            channels_last: false,
            late: None,
            tuned: Some(Box::default()),
            w_shape: ws.to_vec(),
            packed: nn::ConvPack::Direct(wv.to_vec()),
        });
    }
    if nn::gathered_applies(ws, group) {
        return Some(Kind::Conv {
            attrs: attrs.clone(),
            fused,
            channels_last: false,
            late: Default::default(),
            tuned: tunable(attrs, ws).then(Box::default),
            w_shape: ws.to_vec(),
            packed: nn::pack_conv_weights_gathered(wv, ws),
        });
    }
    Some(Kind::Conv {
        attrs: attrs.clone(),
        fused,
        channels_last: false,
        late: out_hw(out_shape).is_none().then(Default::default),
        tuned: tunable(attrs, ws).then(Box::default),
        w_shape: ws.to_vec(),
        packed: nn::pack_conv_weights(
            wv,
            m,
            group,
            out_positions(out_shape, ws.len()).is_some_and(|o| {
                nn::prefers_positions(o, m / group, wv.len() / m, nn::is_pointwise(attrs, ws))
            }),
        ),
    })
}

/// The weights a prepared conv runs with on X of shape `x_shape`: `packed`,
/// or, on AVX-512 when `packed` is for a GEMM and Winograd applies to this
/// run's output planes (which the plan could not see: symbolic input sizes,
/// as in PaddleOCR's detector, whose 96 -> 24 3x3 convs on 160x160 ran
/// 4.4 ms each as a GEMM and 1.5 ms as Winograd), Winograd weights made
/// once from the packed ones. A run whose planes are too small for it keeps
/// the GEMM.
fn late_pack<'a>(
    attrs: &ConvAttrs,
    w_shape: &[usize],
    packed: &'a nn::ConvPack,
    late: &'a std::sync::OnceLock<Option<nn::ConvPack>>,
    x_shape: &[usize],
) -> &'a nn::ConvPack {
    #[cfg(target_arch = "x86_64")]
    {
        let plane = match nn::conv_geometry(attrs, x_shape, w_shape) {
            Ok(g) if g.win.out.len() == 2 => Some((g.win.out[0], g.win.out[1])),
            _ => None,
        };
        let gemm = matches!(
            packed,
            nn::ConvPack::Channels(_) | nn::ConvPack::Positions(_)
        );
        if gemm
            && plane.is_some()
            && nn::winograd_applies(
                w_shape,
                attrs.group,
                &attrs.strides,
                &attrs.dilations,
                plane,
            )
        {
            let made = late.get_or_init(|| {
                let w = packed.unpack()?;
                Some(nn::ConvPack::Winograd(nn::WinogradWeights::new(
                    &w, w_shape[0], w_shape[1],
                )))
            });
            if let Some(p) = made {
                return p;
            }
        }
    }
    let _ = (attrs, w_shape, late, x_shape);
    packed
}

/// A prepared conv's tuning (`tune.rs`): claimed by the first run, which
/// times the candidates outside any lock, then filled with that run's X
/// shape and choice.
#[derive(Default)]
struct TunedSlot {
    claimed: std::sync::atomic::AtomicBool,
    done: std::sync::OnceLock<(Vec<usize>, Option<nn::ConvPack>)>,
}

impl TunedSlot {
    /// The weights a run on X of shape `xs` takes: the tuned choice for the
    /// shape that was tuned (`packed` when tuning kept the heuristics'
    /// choice), made now by `tune` if no run claimed the slot yet. `None`
    /// for other shapes (symbolic dims: the heuristics decide), and while
    /// another run is timing: a run sharing the session, or this very
    /// thread, which the pool may hand another run's job while it waits in
    /// the timing's parallel loops (so `tune` never runs inside a lock).
    fn pick<'a>(
        &'a self,
        xs: &[usize],
        packed: &'a nn::ConvPack,
        tune: impl FnOnce() -> Option<nn::ConvPack>,
    ) -> Option<&'a nn::ConvPack> {
        use std::sync::atomic::Ordering;
        if self.done.get().is_none() && !self.claimed.swap(true, Ordering::AcqRel) {
            let chosen = tune();
            // Only the claiming run sets it.
            let _ = self.done.set((xs.to_vec(), chosen));
        }
        match self.done.get() {
            Some((shape, chosen)) if shape.as_slice() == xs => {
                Some(chosen.as_ref().unwrap_or(packed))
            }
            _ => None,
        }
    }
}

/// Whether a prepared conv with these attributes and W shape has more than
/// one strategy worth timing ([`tune_conv`]): tuning on, one group, 2-D.
fn tunable(attrs: &ConvAttrs, w_shape: &[usize]) -> bool {
    crate::tune::enabled() && attrs.group == 1 && w_shape.len() == 4
}

/// What identifies a conv's tuning problem: its shapes, resolved window
/// (so unset attributes and their explicit defaults, or an `auto_pad` and
/// the pads it means, share a key), epilogue and thread count (the choice
/// can differ on each).
fn tune_key(
    attrs: &ConvAttrs,
    fused: Option<FusedAct>,
    w_shape: &[usize],
    x_shape: &[usize],
    residual: bool,
) -> String {
    let window = match nn::conv_geometry(attrs, x_shape, w_shape) {
        Ok(g) => format!(
            "strides{:?} dilations{:?} pads{:?}{:?}",
            g.win.strides, g.win.dilations, g.win.pad_begin, g.win.pad_end
        ),
        // Not a valid conv: its runs fail before any tuning.
        Err(_) => format!("{attrs:?}"),
    };
    format!(
        "conv x{x_shape:?} w{w_shape:?} {window} act {} residual {residual} threads {}",
        fused.map_or("none", FusedAct::name),
        rayon::current_num_threads()
    )
}

/// The fastest way to run a one-group conv on X of shape `x_shape` (see
/// `tune.rs`), among the product over channel rows, over position rows,
/// gathered channels-last (where the GEMM reads gathers in place), Winograd
/// (where it applies to these planes), the blocked direct kernel (few
/// input channels, or many on a stride-1 or -2 window) and the direct
/// kernel with channels in lanes (AVX-512), each packed from `packed`'s
/// weights: the choice remembered for `key`, else the fastest of them run
/// by `run` on this run's inputs. `None` keeps `packed` (the heuristics'
/// choice: it is also chosen when nothing else applies, when it runs under
/// `tune.rs`'s threshold, or when a run fails, which the real run then
/// reports).
fn tune_conv(
    attrs: &ConvAttrs,
    w_shape: &[usize],
    packed: &nn::ConvPack,
    x_shape: &[usize],
    key: &str,
    run: &dyn Fn(&nn::ConvPack) -> crate::Result<Tensor>,
) -> Option<nn::ConvPack> {
    let mine = packed.strategy();
    let remembered = crate::tune::recall(key);
    if remembered.as_deref() == Some(mine) {
        // The heuristics' own choice, made before: nothing to unpack.
        return None;
    }
    let w = packed.unpack_with_shape(w_shape)?;
    let (m, c) = (*w_shape.first()?, *w_shape.get(1)?);
    let plane = match nn::conv_geometry(attrs, x_shape, w_shape) {
        Ok(g) if g.win.out.len() == 2 => (g.win.out[0], g.win.out[1]),
        _ => return None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (plane, c);
    // The weights for `strategy`, where it can run this conv.
    let build = |strategy: &str| match strategy {
        "channels" => Some(nn::pack_conv_weights(&w, m, 1, false)),
        "positions" => Some(nn::pack_conv_weights(&w, m, 1, true)),
        "gathered" if nn::gathered_possible(w_shape, attrs.group) => {
            Some(nn::pack_conv_weights_gathered(&w, w_shape))
        }
        #[cfg(target_arch = "x86_64")]
        "winograd"
            if nn::winograd_applies(
                w_shape,
                attrs.group,
                &attrs.strides,
                &attrs.dilations,
                Some(plane),
            ) =>
        {
            Some(nn::ConvPack::Winograd(nn::WinogradWeights::new(&w, m, c)))
        }
        "direct" if nn::direct_possible(c, &w_shape[2..], &attrs.strides, &attrs.dilations) => {
            Some(nn::ConvPack::Direct(w.clone()))
        }
        #[cfg(target_arch = "x86_64")]
        "lanes" if nn::lanes_possible(w_shape, attrs.group, &attrs.strides) => {
            nn::LanesWeights::new(&w, w_shape).map(nn::ConvPack::Lanes)
        }
        _ => None,
    };
    // A choice made before: only its weights are made.
    if let Some(name) = remembered {
        return build(&name);
    }
    let mut others: Vec<nn::ConvPack> = [
        "channels",
        "positions",
        "gathered",
        "winograd",
        "direct",
        "lanes",
    ]
    .into_iter()
    .filter(|&s| s != mine)
    .filter_map(build)
    .collect();
    if others.is_empty() {
        return None;
    }
    let all: Vec<&nn::ConvPack> = std::iter::once(packed).chain(&others).collect();
    let mut failed = false;
    let (best, times) = crate::tune::fastest(all.len(), |i| match run(all[i]) {
        Ok(y) => crate::buffers::recycle_tensor(y),
        Err(_) => failed = true,
    });
    if failed {
        return None;
    }
    if !times.is_empty() {
        let list: Vec<String> = all
            .iter()
            .zip(&times)
            .map(|(p, t)| format!("{} {:.3} ms", p.strategy(), t.as_secs_f64() * 1e3))
            .collect();
        tracing::debug!(
            "tuned {key}: {} -> {}",
            list.join(", "),
            all[best].strategy()
        );
    }
    crate::tune::remember(key, all[best].strategy());
    match best {
        0 => None,
        i => Some(others.swap_remove(i - 1)),
    }
}

fn prepare_matmul(fused: Option<FusedAct>, b: &Tensor) -> Option<Kind> {
    if b.rank() != 2 {
        return None;
    }
    let (k, n) = (b.shape()[0], b.shape()[1]);
    Some(Kind::MatMul {
        fused,
        b_shape: b.shape().to_vec(),
        packed: Arc::new(PackedB::new(MatRef::row_major(b.as_slice::<f32>()?, k, n))),
    })
}

/// Whether `gather`, a Gather along axis 0 of the constant table `data`,
/// can read its rows from the panels [`prepare`] makes for `product`'s
/// constant B `b`: `product` is a MatMul, FusedMatMul or Gemm whose packed
/// operand (B, or B^T for a Gemm with `transB`) is bit for bit `data`'s
/// transpose. A tied embedding: GPT-2's token table is also its LM head.
pub fn tied_table(gather: &Op, data: &Tensor, product: &Op, b: &Tensor) -> bool {
    let (Op::Gather { axis: 0 | -2 }, Some(d), Some(bv)) =
        (gather, data.as_slice::<f32>(), b.as_slice::<f32>())
    else {
        return false;
    };
    let packs_b_transposed = match product {
        Op::MatMul | Op::Fused(FusedOp::MatMul { .. }) => false,
        Op::Gemm { trans_b, .. } => *trans_b,
        _ => return false,
    };
    let [rows, width] = *data.shape() else {
        return false;
    };
    let same = |x: f32, y: f32| x.to_bits() == y.to_bits();
    if packs_b_transposed {
        // Packed B^T, whose transpose is b itself.
        b.shape() == data.shape() && d.iter().zip(bv).all(|(&x, &y)| same(x, y))
    } else {
        // b is [width, rows]: d[r][c] must be b[c][r]. In tiles, so that both
        // sides stay in cache.
        const T: usize = 64;
        b.shape() == [width, rows]
            && (0..rows).step_by(T).all(|r0| {
                (0..width).step_by(T).all(|c0| {
                    (r0..rows.min(r0 + T)).all(|r| {
                        (c0..width.min(c0 + T)).all(|c| same(d[r * width + c], bv[c * rows + r]))
                    })
                })
            })
    }
}

/// A Gather along axis 0 of a `[rows, width]` table that [`tied_table`]
/// found in `product`'s packed B: it reads its rows from those panels, and
/// the table itself can be freed. None when `op` is not such a Gather or
/// `product` holds no packed B of shape `[width, rows]`.
pub fn prepare_gather_from(
    op: &Op,
    table_shape: &[usize],
    product: &PreparedOp,
) -> Option<PreparedOp> {
    let Op::Gather { axis: 0 | -2 } = op else {
        return None;
    };
    let table = product.packed_b()?;
    if table_shape != [table.cols(), table.rows()] {
        return None;
    }
    Some(PreparedOp {
        op: op.clone(),
        kind: Kind::Gather {
            table: table.clone(),
        },
    })
}

/// The output plane's height and width when the plan knows both for a 2-D
/// conv (`[N, M, H, W]`).
#[cfg(target_arch = "x86_64")]
fn out_hw(out_shape: Option<&[Option<usize>]>) -> Option<(usize, usize)> {
    match out_shape? {
        [_, _, Some(h), Some(w)] => Some((*h, *w)),
        _ => None,
    }
}

/// Output positions per image (the product of the spatial dims) when the
/// plan knows every one of them for a rank-`rank` output.
fn out_positions(out_shape: Option<&[Option<usize>]>, rank: usize) -> Option<usize> {
    let s = out_shape?;
    if s.len() != rank || rank < 3 {
        return None;
    }
    s[2..]
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul((*d)?))
}

impl PreparedOp {
    /// The input whose data this op holds packed (W for Conv, B for
    /// MatMul/Gemm, the table for Gather): `run` does not read it, so the
    /// caller may pass None.
    pub fn packed_input(&self) -> usize {
        match self.kind {
            Kind::Gather { .. } => 0,
            _ => 1,
        }
    }

    /// The packed right operand of a MatMul or Gemm, for
    /// [`prepare_gather_from`].
    pub fn packed_b(&self) -> Option<&Arc<PackedB>> {
        match &self.kind {
            Kind::MatMul { packed, .. } | Kind::Gemm { packed, .. } => Some(packed),
            Kind::Conv { .. }
            | Kind::Gather { .. }
            | Kind::PointwiseDepthwise { .. }
            | Kind::DepthwiseNhwc { .. } => None,
        }
    }

    /// Same contract as `run_op`: the node's present inputs, except that the
    /// [`packed_input`](Self::packed_input) may be None.
    pub fn run(
        &self,
        inputs: &[Option<&Tensor>],
        num_outputs: usize,
    ) -> crate::Result<Vec<Tensor>> {
        let name = self.op.name();
        // The packed input must be the one that was packed: same dtype, shape.
        let (packed_shape, packed_what) = match &self.kind {
            Kind::Conv { w_shape, .. } => (w_shape.as_slice(), "W"),
            Kind::MatMul { b_shape, .. } | Kind::Gemm { b_shape, .. } => (b_shape.as_slice(), "B"),
            Kind::PointwiseDepthwise { w1, .. } => (w1.shape(), "W1"),
            Kind::DepthwiseNhwc { w, .. } => (w.shape(), "W"),
            // Its indices are integers: none of the f32 checks below apply.
            Kind::Gather { table } => {
                return match inputs.first().copied().flatten() {
                    // Given the table after all: the plain kernel on it.
                    Some(_) => crate::run_op(&self.op, inputs, num_outputs),
                    None => Ok(vec![gather_columns(
                        table,
                        crate::required(inputs, 1, "Gather indices")?,
                    )?]),
                };
            }
        };
        let given = inputs.get(1).copied().flatten();
        if let Some(given) = given {
            if given.dtype() != DType::F32 || given.shape() != packed_shape {
                return Err(invalid!(
                    "{name}: {packed_what} was prepared as f32 {packed_shape:?} but the run gives {} {:?}",
                    given.dtype(),
                    given.shape()
                ));
            }
        }
        // Anything else not f32 (e.g. f16 activations): the unprepared kernel,
        // which needs the original weights.
        if let Some(t) = inputs.iter().flatten().find(|t| t.dtype() != DType::F32) {
            if given.is_none() {
                return Err(invalid!(
                    "{name}: {packed_what} was prepared for f32 inputs, but an input is {}",
                    t.dtype()
                ));
            }
            return crate::run_op(&self.op, inputs, num_outputs);
        }
        let x = |i: usize, what: &str| crate::required(inputs, i, &format!("{name} {what}"));
        let opt = |i: usize| crate::optional(inputs, i);
        let y = match &self.kind {
            Kind::Conv {
                attrs,
                fused,
                channels_last,
                w_shape,
                packed,
                late,
                tuned,
            } => {
                let run_with = |packed: &nn::ConvPack| match fused {
                    Some(act) => {
                        let (conv, act) = (attrs.clone(), *act);
                        let op = if *channels_last {
                            FusedOp::ConvNhwc { conv, act }
                        } else {
                            FusedOp::Conv { conv, act }
                        };
                        fused::run_fast(&op, inputs, fused::Packed::Conv(packed, w_shape))
                    }
                    None => nn::conv_f32(
                        attrs,
                        x(0, "X")?,
                        w_shape,
                        nn::ConvWeights::Packed(packed),
                        opt(2),
                        None,
                        FusedAct::Identity,
                    ),
                };
                let xs = x(0, "X")?.shape();
                let chosen = match tuned {
                    Some(slot) if !*channels_last => slot.pick(xs, packed, || {
                        let key = tune_key(attrs, *fused, w_shape, xs, opt(3).is_some());
                        tune_conv(attrs, w_shape, packed, xs, &key, &run_with)
                    }),
                    _ => None,
                };
                let packed = match (chosen, late) {
                    (Some(chosen), _) => chosen,
                    (None, Some(late)) if !*channels_last => {
                        late_pack(attrs, w_shape, packed, late, xs)
                    }
                    _ => packed,
                };
                run_with(packed)?
            }
            Kind::MatMul { fused, packed, .. } => match fused {
                Some(act) => fused::run_fast(
                    &FusedOp::MatMul { act: *act },
                    inputs,
                    fused::Packed::MatMul(packed),
                )?,
                None => {
                    let a = x(0, "A")?;
                    let s = nn::matmul_shape(a.shape(), &[packed.rows(), packed.cols()])?;
                    let y = nn::matmul_f32(
                        &s,
                        nn::f32_slice(a, "MatMul A")?,
                        MatmulB::Packed(packed),
                        None,
                    )?;
                    crate::util::tensor(s.out_shape, TensorData::F32(y))?
                }
            },
            Kind::Gemm {
                alpha,
                beta,
                trans_a,
                packed,
                ..
            } => {
                let a = x(0, "A")?;
                if a.rank() != 2 {
                    return Err(invalid!("Gemm expects 2-D A, got A {:?}", a.shape()));
                }
                let av = nn::f32_slice(a, "Gemm A")?;
                let (r, c) = (a.shape()[0], a.shape()[1]);
                let view = MatRef::row_major(av, r, c);
                let view = if *trans_a { view.t() } else { view };
                let (m, k, n) = (view.rows(), view.cols(), packed.cols());
                if k != packed.rows() {
                    return Err(invalid!(
                        "Gemm: inner dimensions differ: A {:?} (trans_a={trans_a}) gives K={k}, the prepared B gives K={}",
                        a.shape(),
                        packed.rows()
                    ));
                }
                let c = match opt(2).filter(|_| *beta != 0.0) {
                    Some(c) => {
                        if broadcast_shape(c.shape(), &[m, n])? != [m, n] {
                            return Err(invalid!(
                                "Gemm: C {:?} does not broadcast to the output [{m}, {n}]",
                                c.shape()
                            ));
                        }
                        Some((
                            nn::f32_slice(c, "Gemm C")?,
                            broadcast_indices(c.shape(), &[m, n]),
                        ))
                    }
                    None => None,
                };
                nn::gemm_f32(*alpha, *beta, view, Rhs::Packed(packed), c)?
            }
            Kind::Gather { table } => gather_columns(table, x(1, "indices")?)?,
            Kind::PointwiseDepthwise {
                w1,
                pw,
                pointwise,
                depthwise,
            } => {
                let (xt, wd) = (x(0, "X")?, x(3, "Wd")?);
                #[cfg(target_arch = "x86_64")]
                let one = match &self.op {
                    Op::Fused(FusedOp::PointwiseDepthwise { pw_act, dw, act }) => {
                        nn::pointwise_depthwise_f32(*pw_act, dw, *act, xt, w1, opt(2), wd, opt(4))?
                    }
                    _ => None,
                };
                #[cfg(not(target_arch = "x86_64"))]
                let one: Option<Tensor> = None;
                match one {
                    Some(y) => y,
                    None => {
                        let mid = match pw {
                            Some(pw) => pw.run(&[Some(xt), None, opt(2)], 1)?.pop(),
                            None => Some(fused::run(pointwise, &[Some(xt), Some(w1), opt(2)])?),
                        };
                        let mid = mid
                            .ok_or_else(|| invalid!("{name}: the pointwise conv gave no output"))?;
                        let y = fused::run(depthwise, &[Some(&mid), Some(wd), opt(4)]);
                        crate::buffers::recycle_tensor(mid);
                        y?
                    }
                }
            }
            Kind::DepthwiseNhwc { w, lanes } => {
                let Op::Fused(op) = &self.op else {
                    return Err(invalid!(
                        "{name}: prepared as a channels-last depthwise conv"
                    ));
                };
                let mut given: Vec<Option<&Tensor>> = inputs.to_vec();
                given.resize(given.len().max(2), None);
                given[1] = Some(w);
                fused::run_fast(op, &given, fused::Packed::DepthwiseLanes(lanes))?
            }
        };
        Ok(vec![y])
    }
}

/// Gather along axis 0 of D = `table`^T: output row r is column `idx[r]` of
/// the packed table. The indices are checked (and negative ones resolved)
/// like the plain kernel's.
fn gather_columns(table: &PackedB, idx: &Tensor) -> crate::Result<Tensor> {
    let (width, rows) = (table.rows(), table.cols());
    let resolved = crate::shape_ops::gather_indices(idx, rows, 0)?;
    let mut shape = idx.shape().to_vec();
    shape.push(width);
    let mut out = vec![0.0f32; crate::shape_ops::output_len("Gather", &shape)?];
    if width > 0 {
        for (o, &j) in out.chunks_exact_mut(width).zip(&resolved) {
            table.column_into(j, o);
        }
    }
    crate::util::tensor(shape, TensorData::F32(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::*;
    use kiln_ir::AutoPad;

    fn conv_attrs(group: usize, pads: &[usize], strides: &[usize]) -> ConvAttrs {
        ConvAttrs {
            auto_pad: AutoPad::NotSet,
            dilations: vec![],
            group,
            kernel_shape: vec![],
            pads: pads.to_vec(),
            strides: strides.to_vec(),
        }
    }

    /// Runs `op` prepared on input `const_idx` and unprepared; both must agree.
    fn check_prepared(op: &Op, inputs: &[Option<&Tensor>], const_idx: usize) {
        check_prepared_hinted(op, inputs, const_idx, None)
    }

    /// `check_prepared` with an output-shape hint for the plan-time choices.
    fn check_prepared_hinted(
        op: &Op,
        inputs: &[Option<&Tensor>],
        const_idx: usize,
        hint: Option<&[Option<usize>]>,
    ) {
        let mut consts: Vec<Option<&Tensor>> = vec![None; inputs.len()];
        consts[const_idx] = inputs[const_idx];
        let p = prepare(op, &consts, hint).expect("op should be prepared");
        if let (Some(h), Op::Conv(_) | Op::Fused(FusedOp::Conv { .. })) = (hint, op) {
            // The orientation follows the hint's plane size and W's shape.
            let w = inputs[1].expect("conv W").shape();
            let plane: usize = h[2..].iter().map(|d| d.unwrap_or(0)).product();
            let attrs = match op {
                Op::Conv(a) | Op::Fused(FusedOp::Conv { conv: a, .. }) => a,
                _ => unreachable!("matched a conv above"),
            };
            let positions = nn::prefers_positions(
                plane,
                w[0] / (inputs[0].unwrap().shape()[1] / w[1]),
                w[1..].iter().product(),
                nn::is_pointwise(attrs, w),
            );
            let want = if nn::gathered_applies(w, attrs.group) {
                "gathered channels-last"
            } else if positions {
                "for position rows"
            } else {
                "for channel rows"
            };
            assert!(
                format!("{p:?}").contains(want),
                "{p:?} should be packed {want}"
            );
        }
        let got = p.run(inputs, 1).unwrap();
        let want = crate::run_op(op, inputs, 1).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].shape(), want[0].shape(), "{op:?}");
        assert_close(&f32s(&got[0]), &f32s(&want[0]), 1e-4);
        // Without the packed input (the runtime freed the constant): same values.
        let mut without = inputs.to_vec();
        without[p.packed_input()] = None;
        let held = p.run(&without, 1).unwrap();
        assert_eq!(f32s(&held[0]), f32s(&got[0]), "{op:?}");
    }

    #[test]
    fn prepared_conv_matches_unprepared() {
        let mut rng = Rng::new(21);
        // (N, C, M, group, H, W, k, pads, strides), at least 5 input channels
        // per group (fewer take the direct kernel, not prepared).
        for &(n, c, m, g, h, w, k, p, s) in &[
            (1, 5, 8, 1, 9, 7, 3, 1, 1),
            (2, 10, 6, 2, 6, 6, 3, 0, 2),
            (1, 5, 7, 1, 5, 5, 1, 0, 1),
            (1, 8, 4, 1, 11, 9, 7, 3, 2),
            (3, 16, 70, 1, 7, 7, 3, 1, 1),
            (2, 12, 130, 2, 4, 5, 1, 0, 1),
            (5, 15, 9, 3, 5, 4, 3, 2, 2),
            // Deep and wide enough for position rows with the true hint.
            (2, 64, 130, 1, 4, 5, 3, 1, 1),
            (3, 128, 256, 2, 3, 3, 3, 1, 1),
        ] {
            let x = t(&[n, c, h, w], rng.vec(n * c * h * w));
            let wt = t(&[m, c / g, k, k], rng.vec(m * (c / g) * k * k));
            let b = t(&[m], rng.vec(m));
            let a = conv_attrs(g, &[p; 4], &[s, s]);
            let y = crate::run_op(&Op::Conv(a.clone()), &[Some(&x), Some(&wt)], 1).unwrap();
            let res = t(y[0].shape(), rng.vec(y[0].len()));
            let fused = Op::Fused(FusedOp::Conv {
                conv: a.clone(),
                act: FusedAct::Relu,
            });
            // No hint (weights packed for channel rows), the true output
            // shape (small planes: position rows) and a wrong hint (the
            // packing is only a speed choice; values must not change).
            let true_hint: Vec<Option<usize>> = y[0].shape().iter().map(|&d| Some(d)).collect();
            let small_hint = [None, None, Some(1), Some(1)];
            for hint in [None, Some(&true_hint[..]), Some(&small_hint[..])] {
                let conv = Op::Conv(a.clone());
                check_prepared_hinted(&conv, &[Some(&x), Some(&wt), Some(&b)], 1, hint);
                check_prepared_hinted(&conv, &[Some(&x), Some(&wt)], 1, hint);
                let inputs = [Some(&x), Some(&wt), Some(&b), Some(&res)];
                check_prepared_hinted(&fused, &inputs, 1, hint);
            }
        }
    }

    #[test]
    fn prepared_pointwise_depthwise_matches_unprepared() {
        // Small planes (the two convs apart, the pointwise one prepared) and
        // an expansion of 16.8 MB (one kernel on AVX-512 with an L3 of 32 MB
        // or less), with and without biases.
        let mut rng = Rng::new(47);
        for &(n, c, m, hw, s) in &[(2, 8, 24, 20, 1), (1, 6, 16, 31, 2), (1, 2, 16, 512, 1)] {
            let x = t(&[n, c, hw, hw], rng.vec(n * c * hw * hw));
            let w1 = t(&[m, c, 1, 1], rng.vec(m * c));
            let b1 = t(&[m], rng.vec(m));
            let wd = t(&[m, 1, 3, 3], rng.vec(m * 9));
            let bd = t(&[m], rng.vec(m));
            let op = Op::Fused(FusedOp::PointwiseDepthwise {
                pw_act: FusedAct::Clip { min: 0.0, max: 6.0 },
                dw: conv_attrs(m, &[1; 4], &[s, s]),
                act: FusedAct::Relu,
            });
            check_prepared(
                &op,
                &[Some(&x), Some(&w1), Some(&b1), Some(&wd), Some(&bd)],
                1,
            );
            check_prepared(&op, &[Some(&x), Some(&w1), None, Some(&wd)], 1);
        }
        // Pointwise weights given at run time in another shape than
        // prepared: an error that names them.
        let op = Op::Fused(FusedOp::PointwiseDepthwise {
            pw_act: FusedAct::Relu,
            dw: conv_attrs(8, &[1; 4], &[1, 1]),
            act: FusedAct::Relu,
        });
        let (w1, wd) = (t(&[8, 4, 1, 1], rng.vec(32)), t(&[8, 1, 3, 3], rng.vec(72)));
        let p = prepare(&op, &[None, Some(&w1)], None).expect("prepared");
        let x = t(&[1, 5, 6, 6], rng.vec(180));
        let other = t(&[8, 5, 1, 1], rng.vec(40));
        let err = p
            .run(&[Some(&x), Some(&other), None, Some(&wd)], 1)
            .unwrap_err();
        assert!(err.to_string().contains("W1"), "{err}");
    }

    #[test]
    fn conv_planned_without_sizes_takes_winograd_once_it_sees_them() {
        // No output hint (symbolic input sizes): W is packed for a GEMM.
        // A run on 16x16 planes (16 Winograd tiles) makes Winograd weights
        // from the packed ones where AVX-512 runs them; a run on 6x6
        // planes keeps the GEMM. Both match the unprepared conv, with the
        // bias and a Relu.
        let mut rng = Rng::new(23);
        let (c, m) = (16, 24);
        let wt = t(&[m, c, 3, 3], rng.vec(m * c * 9));
        let b = t(&[m], rng.vec(m));
        let a = conv_attrs(1, &[1; 4], &[1, 1]);
        let op = Op::Fused(FusedOp::Conv {
            conv: a.clone(),
            act: FusedAct::Relu,
        });
        let p = prepare(&op, &[None, Some(&wt), None], None).expect("prepared");
        assert!(format!("{p:?}").contains("channel rows"), "{p:?}");
        for hw in [16, 6, 16] {
            let x = t(&[2, c, hw, hw], rng.vec(2 * c * hw * hw));
            let inputs = [Some(&x), Some(&wt), Some(&b)];
            let want = crate::run_op(&op, &inputs, 1).unwrap();
            let got = p.run(&[Some(&x), None, Some(&b)], 1).unwrap();
            assert_close(&f32s(&got[0]), &f32s(&want[0]), 1e-4);
        }
        let Kind::Conv {
            late: Some(late), ..
        } = &p.kind
        else {
            panic!("a conv planned without sizes keeps a late slot");
        };
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            assert!(
                matches!(late.get(), Some(Some(nn::ConvPack::Winograd(_)))),
                "Winograd weights were made"
            );
            return;
        }
        assert!(late.get().is_none(), "no Winograd off AVX-512");
    }

    /// A prepared conv with its tuning slot on (this crate's tests keep
    /// tuning off elsewhere).
    fn prepared_tuned(op: &Op, w: &Tensor) -> PreparedOp {
        let mut p = prepare(op, &[None, Some(w)], None).expect("a GEMM conv is prepared");
        match &mut p.kind {
            Kind::Conv { tuned, .. } => *tuned = Some(Box::default()),
            _ => panic!("a conv prepares as Kind::Conv"),
        }
        p
    }

    /// Whether the channels-in-lanes kernel runs on this machine.
    fn lanes_runs_here() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The strategy the tuned slot holds after a run (the heuristics' own
    /// when it kept `packed`).
    fn tuned_strategy(p: &PreparedOp) -> &'static str {
        match &p.kind {
            Kind::Conv { tuned, packed, .. } => match tuned.as_ref().and_then(|t| t.done.get()) {
                Some((_, Some(chosen))) => chosen.strategy(),
                Some((_, None)) => packed.strategy(),
                None => panic!("the run filled the tuning slot"),
            },
            _ => panic!("a conv prepares as Kind::Conv"),
        }
    }

    #[test]
    fn tuned_convs_match_unprepared_and_remember_their_choice() {
        // 3x3 convs with several strategies (channel rows, position rows,
        // gathered, and Winograd on AVX-512 at stride 1), with bias,
        // residual and activations; each is timed on its first run, and
        // every later run uses the choice. Outputs match the plain conv.
        let mut rng = Rng::new(41);
        for (c, m, hw, stride, act, residual) in [
            (32, 64, 20, 1, FusedAct::Relu, false),
            (16, 32, 33, 2, FusedAct::Silu, false),
            (24, 48, 12, 1, FusedAct::Identity, true),
        ] {
            let attrs = conv_attrs(1, &[1, 1, 1, 1], &[stride, stride]);
            let op = Op::Fused(FusedOp::Conv {
                conv: attrs.clone(),
                act,
            });
            let x = t(&[1, c, hw, hw], rng.vec(c * hw * hw));
            let w = t(&[m, c, 3, 3], rng.vec(m * c * 9));
            let b = t(&[m], rng.vec(m));
            let oh = (hw + 2 - 3) / stride + 1;
            let r = t(&[1, m, oh, oh], rng.vec(m * oh * oh));
            let inputs = [Some(&x), Some(&w), Some(&b), residual.then_some(&r)];
            let want = crate::run_op(&op, &inputs, 1).unwrap();
            let p = prepared_tuned(&op, &w);
            for _ in 0..2 {
                let got = p.run(&inputs, 1).unwrap();
                assert_close(&f32s(&got[0]), &f32s(&want[0]), 1e-4);
            }
            let key = tune_key(&attrs, Some(act), w.shape(), x.shape(), residual);
            let chosen = tuned_strategy(&p);
            // Remembered for the next session with these shapes (the
            // heuristics' own choice too, so it is not timed again).
            assert_eq!(crate::tune::recall(&key).as_deref(), Some(chosen), "{key}");
        }
    }

    #[test]
    fn a_remembered_choice_is_taken() {
        let mut rng = Rng::new(43);
        let attrs = conv_attrs(1, &[1, 1, 1, 1], &[2, 2]);
        let op = Op::Conv(attrs.clone());
        let x = t(&[1, 8, 17, 17], rng.vec(8 * 17 * 17));
        let w = t(&[16, 8, 3, 3], rng.vec(16 * 8 * 9));
        let inputs = [Some(&x), Some(&w)];
        let want = crate::run_op(&op, &inputs, 1).unwrap();
        // Whichever strategy the heuristics pick, another one remembered.
        let heuristic = match &prepare(&op, &[None, Some(&w)], None).unwrap().kind {
            Kind::Conv { packed, .. } => packed.strategy(),
            _ => unreachable!("a conv prepares as Kind::Conv"),
        };
        let other = if heuristic == "positions" {
            "channels"
        } else {
            "positions"
        };
        let key = tune_key(&attrs, None, w.shape(), x.shape(), false);
        crate::tune::remember(&key, other);
        let p = prepared_tuned(&op, &w);
        let got = p.run(&inputs, 1).unwrap();
        assert_close(&f32s(&got[0]), &f32s(&want[0]), 1e-4);
        assert_eq!(tuned_strategy(&p), other);
        // Another input size (symbolic dims) runs the heuristics' weights,
        // and still matches.
        let x2 = t(&[2, 8, 9, 11], rng.vec(2 * 8 * 9 * 11));
        let inputs2 = [Some(&x2), Some(&w)];
        let got = p.run(&inputs2, 1).unwrap();
        let want = crate::run_op(&op, &inputs2, 1).unwrap();
        assert_close(&f32s(&got[0]), &f32s(&want[0]), 1e-4);
    }

    #[test]
    fn the_direct_kernel_is_a_tuning_candidate() {
        let mut rng = Rng::new(45);
        // A stem (3 input channels) prepared unpacked, as tuning prepares
        // the direct kernel's convs: timed against the GEMMs, then made to
        // take each strategy through the cache; every one matches the
        // plain conv. And a many-channel stride-1 3x3 on planes narrower
        // than the direct kernel takes by itself, told to take it.
        let stem = conv_attrs(1, &[1, 1, 1, 1], &[2, 2]);
        let x = t(&[1, 3, 40, 40], rng.vec(3 * 1600));
        let w = t(&[16, 3, 3, 3], rng.vec(16 * 27));
        let op = Op::Fused(FusedOp::Conv {
            conv: stem.clone(),
            act: FusedAct::Silu,
        });
        let inputs = [Some(&x), Some(&w)];
        let want = crate::run_op(&op, &inputs, 1).unwrap();
        let unpacked = || PreparedOp {
            op: op.clone(),
            kind: Kind::Conv {
                attrs: stem.clone(),
                fused: Some(FusedAct::Silu),
                channels_last: false,
                late: None,
                tuned: Some(Box::default()),
                w_shape: w.shape().to_vec(),
                packed: nn::ConvPack::Direct(f32s(&w)),
            },
        };
        let key = tune_key(&stem, Some(FusedAct::Silu), w.shape(), x.shape(), false);
        for strategy in [
            None,
            Some("channels"),
            Some("positions"),
            Some("gathered"),
            Some("lanes"),
        ] {
            if let Some(s) = strategy {
                crate::tune::remember(&key, s);
            }
            let p = unpacked();
            let got = p.run(&inputs, 1).unwrap();
            assert_close(&f32s(&got[0]), &f32s(&want[0]), 1e-4);
            match strategy {
                // Timed: a failing candidate would leave nothing recorded.
                None => assert!(crate::tune::recall(&key).is_some()),
                Some("gathered") if !kiln_gemm::gathers_in_place() => {}
                Some("lanes") if !lanes_runs_here() => {}
                Some(s) => assert_eq!(tuned_strategy(&p), s),
            }
        }

        let attrs = conv_attrs(1, &[1, 1, 1, 1], &[1, 1]);
        let op = Op::Conv(attrs.clone());
        let x = t(&[1, 12, 9, 10], rng.vec(12 * 90));
        let w = t(&[8, 12, 3, 3], rng.vec(8 * 108));
        let b = t(&[8], rng.vec(8));
        let inputs = [Some(&x), Some(&w), Some(&b)];
        let key = tune_key(&attrs, None, w.shape(), x.shape(), false);
        crate::tune::remember(&key, "direct");
        let p = prepared_tuned(&op, &w);
        let got = p.run(&inputs, 1).unwrap();
        let want = crate::run_op(&op, &inputs, 1).unwrap();
        assert_close(&f32s(&got[0]), &f32s(&want[0]), 1e-4);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            assert_eq!(tuned_strategy(&p), "direct");
        }
    }

    #[test]
    fn a_tuning_slot_is_filled_once_and_never_waited_on() {
        let w: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let packed = nn::pack_conv_weights(&w, 4, 1, false);
        let slot = TunedSlot::default();
        let xs = [1, 8, 5, 5];
        // A run that re-enters while the first one times (the pool can hand
        // this thread another run's job) takes the heuristics' weights
        // instead of waiting on itself.
        let got = slot.pick(&xs, &packed, || {
            assert!(slot
                .pick(&xs, &packed, || panic!("claimed: not timed twice"))
                .is_none());
            Some(nn::pack_conv_weights(&w, 4, 1, true))
        });
        assert_eq!(got.map(|p| p.strategy()), Some("positions"));
        // Filled: the choice for that shape, nothing for others, no timing.
        let again = slot.pick(&xs, &packed, || panic!("filled: not timed again"));
        assert_eq!(again.map(|p| p.strategy()), Some("positions"));
        assert!(slot
            .pick(&[2, 8, 5, 5], &packed, || panic!("filled"))
            .is_none());
        // Tuning that keeps the heuristics' choice runs `packed`.
        let kept = TunedSlot::default();
        let got = kept.pick(&xs, &packed, || None);
        assert_eq!(got.map(|p| p.strategy()), Some("channels"));
    }

    #[test]
    fn tuning_keys_name_the_resolved_window() {
        let (xs, ws) = ([1, 8, 10, 10], [16, 8, 3, 3]);
        let unset = conv_attrs(1, &[], &[]);
        let mut explicit = conv_attrs(1, &[0, 0, 0, 0], &[1, 1]);
        explicit.dilations = vec![1, 1];
        assert_eq!(
            tune_key(&unset, None, &ws, &xs, false),
            tune_key(&explicit, None, &ws, &xs, false)
        );
        let mut same = conv_attrs(1, &[], &[]);
        same.auto_pad = AutoPad::SameUpper;
        let padded = conv_attrs(1, &[1, 1, 1, 1], &[]);
        assert_eq!(
            tune_key(&same, None, &ws, &xs, false),
            tune_key(&padded, None, &ws, &xs, false)
        );
        // Anything that can change the choice changes the key.
        let key = tune_key(&padded, None, &ws, &xs, false);
        assert_ne!(key, tune_key(&unset, None, &ws, &xs, false));
        assert_ne!(
            key,
            tune_key(&padded, Some(FusedAct::Relu), &ws, &xs, false)
        );
        assert_ne!(key, tune_key(&padded, None, &ws, &xs, true));
        assert_ne!(key, tune_key(&padded, None, &ws, &[2, 8, 10, 10], false));
    }

    #[test]
    fn gathered_weights_unpack_to_w() {
        let mut rng = Rng::new(44);
        let ws = [8, 5, 3, 2];
        let w = rng.vec(ws.iter().product());
        let packed = nn::pack_conv_weights_gathered(&w, &ws);
        assert_eq!(packed.unpack_with_shape(&ws), Some(w.clone()));
        // Shapes that do not match the packing: no weights.
        assert_eq!(packed.unpack_with_shape(&[8, 5, 2, 2]), None);
        let channels = nn::pack_conv_weights(&w, 8, 1, false);
        assert_eq!(channels.unpack_with_shape(&ws), Some(w));
    }

    #[test]
    fn small_planes_pack_for_position_rows() {
        // ResNet-50's 3x3 convs on 7x7 and 14x14 planes; not on 28x28, 56x56.
        assert!(nn::prefers_positions(49, 512, 4608, false));
        assert!(nn::prefers_positions(196, 256, 2304, false));
        assert!(!nn::prefers_positions(784, 128, 1152, false));
        assert!(!nn::prefers_positions(3136, 64, 576, false));
        // Few output channels (a 64-wide column panel mostly padding) or a
        // shallow product (packing as narrow A panels costs too much).
        assert!(!nn::prefers_positions(49, 8, 4608, false));
        assert!(!nn::prefers_positions(196, 384, 64, false));
        assert!(!nn::prefers_positions(196, 64, 384, false));
        assert!(!nn::prefers_positions(0, 512, 4608, false));
        // A pointwise conv whose X is read in place stays on channel rows
        // (where the kernel reads partial panels in place), one that big not.
        assert!(nn::prefers_positions(49, 256, 1024, false));
        assert_eq!(
            nn::prefers_positions(49, 256, 1024, true),
            !kiln_gemm::reads_b_in_place(256, 1024, 49)
        );
        assert!(nn::prefers_positions(49, 512, 4608, true));
    }

    #[test]
    fn prepared_matmul_and_gemm_match_unprepared() {
        let mut rng = Rng::new(22);
        let b = t(&[5, 7], rng.vec(35));
        for a_shape in [
            vec![3, 5],
            vec![2, 3, 5],
            vec![5],
            vec![0, 5],
            vec![2, 1, 4, 5],
        ] {
            let a = t(&a_shape, rng.vec(a_shape.iter().product()));
            check_prepared(&Op::MatMul, &[Some(&a), Some(&b)], 1);
            for act in [FusedAct::Identity, FusedAct::GeluErf] {
                let op = Op::Fused(FusedOp::MatMul { act });
                let bias = t(&[7], rng.vec(7));
                check_prepared(&op, &[Some(&a), Some(&b), Some(&bias)], 1);
            }
        }
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (m, k, n) = (4, 5, 3);
            let a = t(&if ta { [k, m] } else { [m, k] }, rng.vec(m * k));
            let bb = t(&if tb { [n, k] } else { [k, n] }, rng.vec(k * n));
            let c = t(&[n], rng.vec(n));
            let op = Op::Gemm {
                alpha: 0.5,
                beta: 2.0,
                trans_a: ta,
                trans_b: tb,
            };
            check_prepared(&op, &[Some(&a), Some(&bb), Some(&c)], 1);
            check_prepared(&op, &[Some(&a), Some(&bb)], 1);
        }
    }

    #[test]
    fn mismatched_runtime_weights_are_an_error() {
        let mut rng = Rng::new(23);
        let w = t(&[4, 5, 3, 3], rng.vec(180));
        let op = Op::Conv(conv_attrs(1, &[1; 4], &[1, 1]));
        let p = prepare(&op, &[None, Some(&w)], None).unwrap();
        let x = t(&[1, 5, 5, 5], rng.vec(125));
        // A W of another shape.
        let w2 = t(&[4, 5, 1, 1], rng.vec(20));
        let e = p.run(&[Some(&x), Some(&w2)], 1).unwrap_err().to_string();
        assert!(
            e.contains("[4, 5, 3, 3]") && e.contains("[4, 5, 1, 1]"),
            "{e}"
        );
        // A W of another dtype.
        let w64 = Tensor::from_vec(vec![4, 5, 3, 3], vec![0.0f64; 180]).unwrap();
        assert!(p.run(&[Some(&x), Some(&w64)], 1).is_err());
        // W left out: the prepared op holds it (the runtime frees the original).
        let held = p.run(&[Some(&x), None], 1).unwrap();
        let want = crate::run_op(&op, &[Some(&x), Some(&w)], 1).unwrap();
        assert_eq!(f32s(&held[0]), f32s(&want[0]));
        // W left out with non-f32 activations: no original to fall back on.
        let x64 = Tensor::from_vec(vec![1, 5, 5, 5], vec![0.0f64; 125]).unwrap();
        let e = p.run(&[Some(&x64), None], 1).unwrap_err().to_string();
        assert!(e.contains("prepared for f32"), "{e}");
        // X with the wrong channel count.
        let x2 = t(&[1, 2, 5, 5], rng.vec(50));
        assert!(p.run(&[Some(&x2), Some(&w)], 1).is_err());
        // MatMul: B of another shape, and an A whose K differs.
        let b = t(&[5, 7], rng.vec(35));
        let p = prepare(&Op::MatMul, &[None, Some(&b)], None).unwrap();
        let a = t(&[3, 5], rng.vec(15));
        let b2 = t(&[7, 5], rng.vec(35));
        assert!(p.run(&[Some(&a), Some(&b2)], 1).is_err());
        let a2 = t(&[3, 4], rng.vec(12));
        assert!(p.run(&[Some(&a2), Some(&b)], 1).is_err());
        // Gemm: A with the wrong K.
        let op = Op::Gemm {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: false,
        };
        let p = prepare(&op, &[None, Some(&b)], None).unwrap();
        assert!(p.run(&[Some(&a2), Some(&b)], 1).is_err());
    }

    #[test]
    fn nothing_to_prepare() {
        let mut rng = Rng::new(24);
        let w = t(&[4, 1, 3, 3], rng.vec(36));
        // Depthwise: read unpacked by the direct kernel.
        let dw = Op::Conv(conv_attrs(4, &[1; 4], &[1, 1]));
        assert!(prepare(&dw, &[None, Some(&w)], None).is_none());
        // One input channel in one group (a grayscale stem, an STFT): a
        // GEMM, so packed; and prepared or not, it computes the same.
        let single = Op::Conv(conv_attrs(1, &[1; 4], &[2, 2]));
        assert!(prepare(&single, &[None, Some(&w)], None).is_some());
        let x = t(&[1, 1, 9, 11], rng.vec(99));
        check_prepared(&single, &[Some(&x), Some(&w)], 1);
        // Few input channels (an RGB stem), likewise where this CPU has the
        // vector kernel for them; with dilation it is a GEMM again, so packed.
        let stem_w = t(&[8, 3, 3, 3], rng.vec(216));
        let stem = conv_attrs(1, &[1; 4], &[2, 2]);
        let direct = nn::uses_direct_kernel(1, 3, &[3, 3], &[2, 2], &[]);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            || (std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma"))
        {
            assert!(
                direct,
                "a 3-channel stem takes the direct kernel on AVX2/AVX-512"
            );
        }
        assert_eq!(
            prepare(&Op::Conv(stem.clone()), &[None, Some(&stem_w)], None).is_none(),
            direct
        );
        let dilated = ConvAttrs {
            dilations: vec![2, 2],
            ..stem
        };
        assert!(prepare(&Op::Conv(dilated), &[None, Some(&stem_w)], None).is_some());
        // A 3x3 conv over 16 channels: direct on AVX-512 when the plan knows
        // its output rows are wide; packed for the GEMM when they are narrow
        // or unknown (the run then finds packed weights and takes the GEMM).
        let wide_w = t(&[8, 16, 3, 3], rng.vec(8 * 16 * 9));
        let same = Op::Conv(conv_attrs(1, &[1; 4], &[1, 1]));
        let shape = |w: usize| vec![Some(1), Some(8), Some(w), Some(w)];
        let (wide, narrow) = (shape(56), shape(14));
        let avx512 = nn::many_channel_applies(16, &[3, 3], &[1, 1], &[], Some(56));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(avx512, std::arch::is_x86_feature_detected!("avx512f"));
        assert_eq!(
            prepare(&same, &[None, Some(&wide_w)], Some(&wide)).is_none(),
            avx512
        );
        assert!(prepare(&same, &[None, Some(&wide_w)], Some(&narrow)).is_some());
        assert!(prepare(&same, &[None, Some(&wide_w)], None).is_some());
        // W not constant, or not f32.
        let op = Op::Conv(conv_attrs(1, &[], &[]));
        assert!(prepare(&op, &[None, None], None).is_none());
        let w64 = Tensor::from_vec(vec![4, 3, 3, 3], vec![0.0f64; 108]).unwrap();
        assert!(prepare(&op, &[None, Some(&w64)], None).is_none());
        // Batched B, and ops with no weights.
        let b3 = t(&[2, 3, 4], rng.vec(24));
        assert!(prepare(&Op::MatMul, &[None, Some(&b3)], None).is_none());
        assert!(prepare(&Op::Identity, &[Some(&w)], None).is_none());
    }

    #[test]
    fn prepared_conv_with_f16_input_takes_the_unprepared_kernel() {
        let mut rng = Rng::new(25);
        let w = t(&[2, 5, 1, 1], rng.vec(10));
        let op = Op::Conv(conv_attrs(1, &[], &[]));
        let p = prepare(&op, &[None, Some(&w)], None).unwrap();
        let xv: Vec<half::f16> = rng.vec(20).into_iter().map(half::f16::from_f32).collect();
        let x = Tensor::from_vec(vec![1, 5, 2, 2], xv).unwrap();
        let got = p.run(&[Some(&x), Some(&w)], 1).unwrap();
        let want = crate::run_op(&op, &[Some(&x), Some(&w)], 1).unwrap();
        assert_eq!(got[0].dtype(), DType::F16);
        assert_eq!(got[0], want[0]);
    }

    /// A table tied to a product's packed B: only an exact transpose (or
    /// for Gemm with transB, the same values) of f32 data, for a Gather
    /// along axis 0.
    #[test]
    fn tied_table_needs_bitwise_transposed_weights() {
        let mut rng = Rng::new(26);
        let (rows, width) = (130, 7); // tiles of 64 with tails
        let d = t(&[rows, width], rng.vec(rows * width));
        let dv = f32s(&d);
        let dt: Vec<f32> = (0..width * rows)
            .map(|e| dv[(e % rows) * width + e / rows])
            .collect();
        let d_t = t(&[width, rows], dt.clone());
        let gather = Op::Gather { axis: 0 };
        let gemm = |trans_b| Op::Gemm {
            alpha: 1.0,
            beta: 0.0,
            trans_a: false,
            trans_b,
        };
        let fused = Op::Fused(FusedOp::MatMul {
            act: FusedAct::Identity,
        });
        assert!(tied_table(&gather, &d, &Op::MatMul, &d_t));
        assert!(tied_table(&Op::Gather { axis: -2 }, &d, &fused, &d_t));
        assert!(tied_table(&gather, &d, &gemm(false), &d_t));
        assert!(tied_table(&gather, &d, &gemm(true), &d));
        // Wrong orientation, axis, op, dtype.
        assert!(!tied_table(&gather, &d, &Op::MatMul, &d));
        assert!(!tied_table(&gather, &d, &gemm(true), &d_t));
        assert!(!tied_table(&Op::Gather { axis: 1 }, &d, &Op::MatMul, &d_t));
        assert!(!tied_table(&gather, &d, &Op::Identity, &d_t));
        let d64 = Tensor::from_vec(vec![rows, width], vec![0.0f64; rows * width]).unwrap();
        assert!(!tied_table(&gather, &d64, &Op::MatMul, &d_t));
        // One bit off in the last tile's last element.
        let mut off = dt.clone();
        let last = off.len() - 1;
        off[last] = f32::from_bits(off[last].to_bits() ^ 1);
        assert!(!tied_table(
            &gather,
            &d,
            &Op::MatMul,
            &t(&[width, rows], off)
        ));
        // 0.0 in D against -0.0 in B: equal as floats, not as weights.
        let mut d0 = dv.clone();
        d0[3 * width] = 0.0;
        let mut b0 = dt.clone();
        b0[3] = -0.0;
        let (d0, b0) = (t(&[rows, width], d0), t(&[width, rows], b0));
        assert!(!tied_table(&gather, &d0, &Op::MatMul, &b0));
        let mut b = f32s(&b0);
        b[3] = 0.0;
        assert!(tied_table(&gather, &d0, &Op::MatMul, &t(&[width, rows], b)));
    }

    /// The Gather that reads a tied table from the product's panels gives
    /// the plain kernel's values for every index form, and its errors.
    #[test]
    fn gather_from_packed_panels_matches_the_plain_gather() {
        let mut rng = Rng::new(27);
        let (rows, width) = (70, 5);
        let d = t(&[rows, width], rng.vec(rows * width));
        let dv = f32s(&d);
        let dt: Vec<f32> = (0..width * rows)
            .map(|e| dv[(e % rows) * width + e / rows])
            .collect();
        let d_t = t(&[width, rows], dt);
        let head = prepare(&Op::MatMul, &[None, Some(&d_t)], None).unwrap();
        let op = Op::Gather { axis: 0 };
        assert!(prepare_gather_from(&op, &[width, rows], &head).is_none());
        assert!(prepare_gather_from(&Op::Gather { axis: 1 }, &[rows, width], &head).is_none());
        let p = prepare_gather_from(&op, &[rows, width], &head).unwrap();
        assert_eq!(p.packed_input(), 0);
        let indices = [
            Tensor::from_vec(vec![2, 3], vec![0i64, 69, -1, -70, 63, 64]).unwrap(),
            Tensor::from_vec(vec![4], vec![5i32, 0, 66, -3]).unwrap(),
            Tensor::scalar(12i64),
            Tensor::from_vec(vec![0], Vec::<i64>::new()).unwrap(),
        ];
        for idx in &indices {
            let want = crate::run_op(&op, &[Some(&d), Some(idx)], 1).unwrap();
            let got = p.run(&[None, Some(idx)], 1).unwrap();
            assert_eq!(got[0], want[0], "indices {:?}", idx.shape());
            // Given the table after all: the plain kernel, same values.
            let given = p.run(&[Some(&d), Some(idx)], 1).unwrap();
            assert_eq!(given[0], want[0]);
        }
        for bad in [Tensor::vector(vec![70i64]), Tensor::vector(vec![-71i64])] {
            let e = p.run(&[None, Some(&bad)], 1).unwrap_err().to_string();
            let want = crate::run_op(&op, &[Some(&d), Some(&bad)], 1)
                .unwrap_err()
                .to_string();
            assert_eq!(e, want);
        }
        let floats = Tensor::vector(vec![1.0f32]);
        assert!(p.run(&[None, Some(&floats)], 1).is_err());
        assert!(p.run(&[None, None], 1).is_err());
    }
}
