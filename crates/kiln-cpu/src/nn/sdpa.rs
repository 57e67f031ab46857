//! Fused scaled dot-product attention (`FusedOp::Attention`) in f32.
//!
//! Unfused, an attention head is five ops, each a pass over the `[S, T]`
//! scores in memory and each batched over heads as its own parallel loop:
//! `MatMul(Q, Kt)`, the scale, the mask, Softmax and `MatMul(P, V)`. Here one
//! task takes a block of query rows of one head: it computes the block's
//! scores with one GEMM, scales, masks and softmaxes each row while it is in
//! L1/L2, and multiplies the block by V straight into the output. The scores
//! never leave the task's scratch.
//!
//! Each step is the same operation as the op it replaces (a Div stays a
//! division, the mask is added or selected, Softmax is the same row kernel),
//! so the fused result matches the unfused graph within the GEMM's summation
//! order. `fused::run_reference` composes the unfused ops and is the test
//! reference.

use super::norm::softmax_row;
use crate::{invalid, Result};
use kiln_gemm::{sgemm, Lhs, MatRef, Rhs};
use kiln_ir::{AttnMask, AttnScale, Tensor, TensorData};
use rayon::prelude::*;

/// Scores per task, at most (floats: 256 KiB, so a block's scores stay in
/// L2 while they are softmaxed and multiplied by V).
const MAX_BLOCK_SCORES: usize = 65536;
/// Tasks per pool thread the row blocks aim for, so uneven heads even out.
const TASKS_PER_THREAD: usize = 4;

/// The fused kernel, or `Ok(None)` when the inputs are outside what it takes
/// (not all f32, leading dims that differ and so broadcast, a mask of another
/// dtype): the caller then runs the unfused composition. A mask that does not
/// broadcast to the scores is an error, as the Add or Where it replaces would be.
pub(crate) fn attention_f32(
    q: &Tensor,
    kt: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: AttnScale,
    kind: AttnMask,
) -> Result<Option<Tensor>> {
    let (qs, ks, vs) = (q.shape(), kt.shape(), v.shape());
    let r = qs.len();
    if r < 2
        || ks.len() != r
        || vs.len() != r
        || qs[..r - 2] != ks[..r - 2]
        || qs[..r - 2] != vs[..r - 2]
    {
        return Ok(None);
    }
    let (Some(qv), Some(kv), Some(vv)) = (
        q.as_slice::<f32>(),
        kt.as_slice::<f32>(),
        v.as_slice::<f32>(),
    ) else {
        return Ok(None);
    };
    let (s, d, t, e) = (qs[r - 2], qs[r - 1], ks[r - 1], vs[r - 1]);
    if ks[r - 2] != d || vs[r - 2] != t {
        return Err(invalid!(
            "FusedAttention: inner dims differ: Q {qs:?}, Kt {ks:?}, V {vs:?}"
        ));
    }
    let batch: usize = qs[..r - 2].iter().product();
    let mut scores_shape = qs.to_vec();
    scores_shape[r - 1] = t;
    let mask = match (kind, mask) {
        (AttnMask::None, _) => None,
        (_, None) => return Err(invalid!("FusedAttention: the mask input is missing")),
        (AttnMask::Add, Some(m)) => match m.as_slice::<f32>() {
            Some(vals) => Some(MaskView::new(
                MaskVals::Add(vals),
                m.shape(),
                &scores_shape,
            )?),
            None => return Ok(None),
        },
        (AttnMask::Where { fill, keep_if_true }, Some(m)) => match m.data() {
            TensorData::Bool(cond) => Some(MaskView::new(
                MaskVals::Where {
                    cond,
                    fill,
                    keep_if_true,
                },
                m.shape(),
                &scores_shape,
            )?),
            _ => return Ok(None),
        },
    };
    // Every element is written: by the P.V GEMM (beta 0) or the no-keys fill.
    let mut out = crate::buffers::take_f32(batch * s * e);
    if out.is_empty() {
        return Ok(Some(crate::util::tensor(
            out_shape(qs, e),
            TensorData::F32(out),
        )?));
    }
    let threads = rayon::current_num_threads().max(1);
    let blocks_wanted = (TASKS_PER_THREAD * threads).div_ceil(batch.max(1));
    let max_rows = (MAX_BLOCK_SCORES / t.max(1)).max(8);
    let rows = s.div_ceil(blocks_wanted).clamp(1, max_rows);
    let head = |b: usize, ob: &mut [f32]| {
        let qb = &qv[b * s * d..][..s * d];
        let kb = &kv[b * d * t..][..d * t];
        let vb = &vv[b * t * e..][..t * e];
        ob.par_chunks_mut(rows * e)
            .enumerate()
            .for_each(|(blk, o)| {
                let i0 = blk * rows;
                let n = o.len() / e;
                block(
                    &qb[i0 * d..][..n * d],
                    kb,
                    vb,
                    (n, d, t, e),
                    |i, row| {
                        for x in row.iter_mut() {
                            *x = scale.apply(*x);
                        }
                        if let Some(m) = &mask {
                            m.apply(b, i0 + i, row);
                        }
                    },
                    o,
                );
            });
    };
    out.par_chunks_mut(s * e)
        .enumerate()
        .for_each(|(b, ob)| head(b, ob));
    Ok(Some(crate::util::tensor(
        out_shape(qs, e),
        TensorData::F32(out),
    )?))
}

fn out_shape(qs: &[usize], e: usize) -> Vec<usize> {
    let mut o = qs.to_vec();
    let r = o.len();
    o[r - 1] = e;
    o
}

/// One block of `n` query rows: `out = softmax(prep(Q_blk · Kt)) · V`, where
/// `prep(i, row)` scales and masks the scores of block row `i` in place.
fn block(
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    (n, d, t, e): (usize, usize, usize, usize),
    prep: impl Fn(usize, &mut [f32]),
    out: &mut [f32],
) {
    // A fresh buffer per task: the GEMMs below may run nested parallel work,
    // and a thread that steals another block meanwhile must not share it.
    if t == 0 {
        // Softmax over no keys leaves nothing to weigh: P · V is empty sums.
        out.fill(0.0);
        return;
    }
    // (With d == 0 the GEMM writes zeros: beta is 0 and the sums are empty.)
    let mut scores = vec![0f32; n * t];
    sgemm(
        1.0,
        Lhs::Mat(MatRef::row_major(q, n, d)),
        Rhs::Mat(MatRef::row_major(kt, d, t)),
        0.0,
        &mut scores,
        t,
        None,
    );
    let mut tmp = Vec::new();
    for (i, row) in scores.chunks_exact_mut(t).enumerate() {
        crate::fastmath::simd(|| prep(i, row));
        softmax_row(row, false, &mut tmp);
    }
    sgemm(
        1.0,
        Lhs::Mat(MatRef::row_major(&scores, n, t)),
        Rhs::Mat(MatRef::row_major(v, t, e)),
        0.0,
        out,
        e,
        None,
    );
}

enum MaskVals<'a> {
    Add(&'a [f32]),
    /// Keep the score where `cond == keep_if_true`, else `fill`.
    Where {
        cond: &'a [bool],
        fill: f32,
        keep_if_true: bool,
    },
}

/// A mask broadcast to the `[..., S, T]` scores: per batch (the flattened
/// leading dims) a base offset, and the strides of the query and key axes (0
/// where the mask has size 1).
struct MaskView<'a> {
    vals: MaskVals<'a>,
    batch_base: Vec<usize>,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MaskView<'a> {
    fn new(vals: MaskVals<'a>, ms: &[usize], scores: &[usize]) -> Result<MaskView<'a>> {
        let r = scores.len();
        if ms.len() > r {
            return Err(invalid!(
                "FusedAttention: mask {ms:?} has more dims than the scores {scores:?}"
            ));
        }
        // Strides of the mask over the scores' dims (right-aligned; 0 where
        // the mask has size 1 or lacks the dim).
        let pad = r - ms.len();
        let mut strides = vec![0usize; r];
        let mut acc = 1usize;
        for k in (0..ms.len()).rev() {
            let (m, sdim) = (ms[k], scores[pad + k]);
            if m != 1 && m != sdim {
                return Err(invalid!(
                    "FusedAttention: mask {ms:?} does not broadcast to the scores {scores:?}"
                ));
            }
            strides[pad + k] = if m == 1 { 0 } else { acc };
            acc *= m;
        }
        let batch: usize = scores[..r - 2].iter().product();
        let batch_base = (0..batch)
            .map(|mut b| {
                let mut off = 0;
                for k in (0..r - 2).rev() {
                    off += (b % scores[k]) * strides[k];
                    b /= scores[k];
                }
                off
            })
            .collect();
        Ok(MaskView {
            vals,
            batch_base,
            row_stride: strides[r - 2],
            col_stride: strides[r - 1],
        })
    }

    /// Applies the mask to the scores of batch `b`, query row `i`.
    #[inline(always)]
    fn apply(&self, b: usize, i: usize, row: &mut [f32]) {
        let base = self.batch_base[b] + i * self.row_stride;
        let t = row.len();
        match self.vals {
            MaskVals::Add(m) => {
                if self.col_stride == 1 {
                    for (x, &mv) in row.iter_mut().zip(&m[base..base + t]) {
                        *x += mv;
                    }
                } else {
                    let mv = m[base];
                    row.iter_mut().for_each(|x| *x += mv);
                }
            }
            MaskVals::Where {
                cond: c,
                fill,
                keep_if_true,
            } => {
                if self.col_stride == 1 {
                    for (x, &cv) in row.iter_mut().zip(&c[base..base + t]) {
                        if cv != keep_if_true {
                            *x = fill;
                        }
                    }
                } else if c[base] != keep_if_true {
                    row.fill(fill);
                }
            }
        }
    }
}
