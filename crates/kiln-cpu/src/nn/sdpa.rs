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

use crate::{invalid, Result};
use kiln_gemm::{sgemm, Lhs, MatRef, Rhs};
use kiln_ir::{AttnLayout, AttnMask, AttnScale, Tensor, TensorData};
use rayon::prelude::*;
use std::cell::RefCell;

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
    layout: &AttnLayout,
) -> Result<Option<Tensor>> {
    // The core's operands as views through the absorbed Transposes.
    let (Some(qv), Some(kv), Some(vv)) = (
        q.as_slice::<f32>(),
        kt.as_slice::<f32>(),
        v.as_slice::<f32>(),
    ) else {
        return Ok(None);
    };
    let qo = Operand::new("Q", qv, q.shape(), layout.inputs[0].as_deref())?;
    let ko = Operand::new("Kt", kv, kt.shape(), layout.inputs[1].as_deref())?;
    let vo = Operand::new("V", vv, v.shape(), layout.inputs[2].as_deref())?;
    let (qs, ks, vs) = (&qo.shape[..], &ko.shape[..], &vo.shape[..]);
    let r = qs.len();
    if r < 2
        || ks.len() != r
        || vs.len() != r
        || qs[..r - 2] != ks[..r - 2]
        || qs[..r - 2] != vs[..r - 2]
    {
        return Ok(None);
    }
    let (s, d, t, e) = (qs[r - 2], qs[r - 1], ks[r - 1], vs[r - 1]);
    if ks[r - 2] != d || vs[r - 2] != t {
        return Err(invalid!(
            "FusedAttention: inner dims differ: Q {qs:?}, Kt {ks:?}, V {vs:?}"
        ));
    }
    let lead = &qs[..r - 2];
    let batch: usize = lead.iter().product();
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
    // The output: `[..., S, E]`, then the absorbed Transpose (which keeps
    // E innermost, so each output row is contiguous).
    let mut logical_out = qs.to_vec();
    logical_out[r - 1] = e;
    let out_perm = layout.out.as_deref();
    let Some(final_shape) = AttnLayout::permuted(&logical_out, out_perm)
        .filter(|_| out_perm.is_none_or(|p| p.last() == Some(&(r - 1))))
    else {
        return Err(invalid!(
            "FusedAttention: output perm {out_perm:?} does not fit the output {logical_out:?}"
        ));
    };
    let out_strides = logical_strides(&final_shape, out_perm, true);
    // A scale the Q.Kt product applies as its alpha instead of a pass over
    // the scores: a multiplier, or a division by a power of two (BERT's
    // sqrt(64)), exactly a multiplication by its inverse. The same values
    // while a head's depth fits one k block of the GEMM (up to 1024); deeper, alpha
    // scales each block's partial sum, a rounding apart. Any other division
    // stays a division, in the pass over the scores.
    let (alpha, left_scale) = match scale {
        AttnScale::Mul(c) => (c, AttnScale::None),
        AttnScale::Div(c) if exact_inverse(c) => (1.0 / c, AttnScale::None),
        other => (1.0, other),
    };
    // Every element is written: by the P.V GEMM (beta 0) or the no-keys fill.
    let mut out = crate::buffers::take_f32(batch * s * e);
    if out.is_empty() {
        return Ok(Some(crate::util::tensor(
            final_shape,
            TensorData::F32(out),
        )?));
    }
    let threads = rayon::current_num_threads().max(1);
    let blocks_wanted = (TASKS_PER_THREAD * threads).div_ceil(batch.max(1));
    let max_rows = (MAX_BLOCK_SCORES / t.max(1)).max(8);
    let mut rows = s.div_ceil(blocks_wanted).clamp(1, max_rows);
    // Under a mask that may differ by row (causal), blocks of at most half
    // the queries (a cap of 16 rows at the least): each leaves out the keys
    // masked for all its rows, a quarter of them on average. (GPT-2's 128 x 128 heads, one
    // thread: whole heads 0.385 ms for 12, halves 0.356, quarters 0.39,
    // eighths 0.50: smaller blocks pack K^T more often and run smaller
    // products.)
    if mask.as_ref().is_some_and(|m| m.varies_by_row()) {
        rows = rows.min(s.div_ceil(2).max(16));
    }
    let per_head = s.div_ceil(rows);
    let o_row = out_strides[r - 2];
    // The output rows are one contiguous run per head when no Transpose moved
    // them; then the P.V product is written in place.
    let direct = o_row == e;
    let optr = super::SharedOut(out.as_mut_ptr());
    let out_len = out.len();
    let no_skip = std::sync::atomic::AtomicBool::new(false);
    (0..batch * per_head).into_par_iter().for_each(|task| {
        let (b, blk) = (task / per_head, task % per_head);
        let i0 = blk * rows;
        let n = rows.min(s - i0);
        let o0 = batch_offset(lead, &out_strides, b) + i0 * o_row;
        let prep = Prep {
            scale: left_scale,
            mask: mask.as_ref(),
            b,
            i0,
            no_skip: &no_skip,
        };
        let qb = qo.rows(b, i0, n);
        let (kb, vb) = (ko.rows(b, 0, d), vo.rows(b, 0, t));
        if direct {
            assert!(o0 + n * e <= out_len);
            // SAFETY: task (b, blk) owns output rows i0..i0 + n of head b, the
            // run [o0, o0 + n * e) (rows contiguous, `direct`), inside `out`
            // (asserted); tasks' runs are disjoint and `out` outlives the loop.
            let o = unsafe { std::slice::from_raw_parts_mut(optr.get().add(o0), n * e) };
            block(qb, kb, vb, (n, d, t, e), alpha, &prep, o);
        } else {
            // Every float of the block's rows is written by `block`.
            with_scratch(&OUT_ROWS, n * e, |o| {
                block(qb, kb, vb, (n, d, t, e), alpha, &prep, o);
                assert!(n == 0 || o0 + (n - 1) * o_row + e <= out_len);
                for (i, row) in o.chunks_exact(e.max(1)).enumerate() {
                    // SAFETY: row i0 + i of head b lies at o0 + i * o_row, e
                    // contiguous floats inside `out` (asserted); no other task
                    // writes that row, and `out` outlives the loop.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            row.as_ptr(),
                            optr.get().add(o0 + i * o_row),
                            e,
                        )
                    };
                }
            });
        }
    });
    Ok(Some(crate::util::tensor(
        final_shape,
        TensorData::F32(out),
    )?))
}

/// One of Q, Kt, V: its data and the shape and strides of the core's view of
/// it (through an absorbed Transpose).
struct Operand<'a> {
    data: &'a [f32],
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl<'a> Operand<'a> {
    fn new(what: &str, data: &'a [f32], shape: &[usize], perm: Option<&[usize]>) -> Result<Self> {
        let view = AttnLayout::permuted(shape, perm).ok_or_else(|| {
            invalid!("FusedAttention: {what} perm {perm:?} does not fit its shape {shape:?}")
        })?;
        Ok(Operand {
            data,
            strides: logical_strides(shape, perm, false),
            shape: view,
        })
    }

    /// Rows `i0..i0 + n` of batch `b`'s matrix (the last two view dims).
    fn rows(&self, b: usize, i0: usize, n: usize) -> MatRef<'a> {
        let r = self.shape.len();
        let (rs, cs) = (self.strides[r - 2], self.strides[r - 1]);
        if self.data.is_empty() {
            // A zero-sized dim: the rows or the columns asked for are none.
            return MatRef::new(&[], n, self.shape[r - 1], rs, cs);
        }
        let off = batch_offset(&self.shape[..r - 2], &self.strides, b) + i0 * rs;
        MatRef::new(&self.data[off..], n, self.shape[r - 1], rs, cs)
    }
}

/// Element strides of a transposed view. Not `out`: the view is
/// `Transpose(x, perm)` of a row-major `x` of `shape`, and its axis j has
/// x's stride of axis `perm[j]`. `out`: `shape` is the row-major result of
/// `Transpose(view, perm)`, and view axis `perm[j]` has its stride of axis j.
fn logical_strides(shape: &[usize], perm: Option<&[usize]>, out: bool) -> Vec<usize> {
    let mut st = vec![1usize; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        st[a] = st[a + 1] * shape[a + 1];
    }
    let Some(p) = perm else { return st };
    let mut view = vec![0usize; p.len()];
    for (j, &a) in p.iter().enumerate() {
        if out {
            view[a] = st[j];
        } else {
            view[j] = st[a];
        }
    }
    view
}

/// Offset of flattened batch `b` over the leading dims `lead` (row-major
/// order), with those dims' `strides`.
fn batch_offset(lead: &[usize], strides: &[usize], mut b: usize) -> usize {
    let mut off = 0;
    for k in (0..lead.len()).rev() {
        off += (b % lead[k]) * strides[k];
        b /= lead[k];
    }
    off
}

/// Whether `1 / c` is exact and `x * (1 / c) == x / c` for every x: `c` a
/// normal power of two whose inverse is normal too.
fn exact_inverse(c: f32) -> bool {
    c.is_normal() && c.to_bits() & 0x007f_ffff == 0 && (1.0 / c).is_normal()
}

/// What is left to do to a block's scores before the softmax: the scale
/// the GEMM could not take, and the mask.
struct Prep<'a> {
    scale: AttnScale,
    mask: Option<&'a MaskView<'a>>,
    /// The head, and the block's first query row.
    b: usize,
    i0: usize,
    /// Set when a block found that its masked keys could not be left out
    /// (`Prep::live_keys`), so the op's other blocks do not try.
    no_skip: &'a std::sync::atomic::AtomicBool,
}

impl Prep<'_> {
    /// With a `Where` mask that replaces every key from some `live < t` on
    /// in each of the block's `n` rows (and keeps at least one key in
    /// each): `live` and the fill.
    fn live_keys(&self, n: usize, t: usize) -> Option<(usize, f32)> {
        if self.no_skip.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        self.mask?.live_keys(self.b, self.i0, n, t)
    }

    /// Scales and masks the scores of block row `i` in place (inlined
    /// into `block`'s loop, which is compiled for the CPU's vector ISA).
    #[inline(always)]
    fn apply(&self, i: usize, row: &mut [f32]) {
        if self.scale != AttnScale::None {
            for x in row.iter_mut() {
                *x = self.scale.apply(*x);
            }
        }
        if let Some(m) = self.mask {
            m.apply(self.b, self.i0 + i, row);
        }
    }
}

thread_local! {
    /// A task's output rows, where the output's rows are not contiguous.
    static OUT_ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A task's scores.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Floats a thread keeps in each of its scratch buffers between tasks;
/// bigger ones (few keys and wide rows) are freed after the task.
const SCRATCH_KEEP: usize = 1 << 18;

/// Runs `f` on `len` floats of this thread's `buf` (contents unspecified:
/// `f` must write before it reads). The buffer is taken out for the call and
/// put back after, not borrowed across it: the GEMMs in `f` may run nested
/// parallel work, and a block this thread steals meanwhile then takes a
/// fresh buffer.
fn with_scratch<R>(
    buf: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut v = buf.with(|c| c.take());
    if v.len() < len {
        v.resize(len, 0.0);
    }
    let r = f(&mut v[..len]);
    if v.capacity() <= SCRATCH_KEEP {
        buf.with(|c| c.replace(v));
    }
    r
}

/// One block of `n` query rows: `out = softmax(prep(alpha Q_blk · Kt)) · V`,
/// where `prep` scales and masks the scores of each block row in place.
///
/// The softmax's division by each row's sum is applied to the row's `e`
/// outputs after the `P · V` product instead of to its `t` probabilities
/// before it (`(p / s) · V` as `(p · V) / s`: a rounding apart, and half
/// the work where `t = 2e`, as in BERT's 128 keys of 64-wide heads; the
/// sums before the division are at most `t` times larger, which overflows
/// only for values within a factor `t` of `f32::MAX`).
#[allow(clippy::too_many_arguments)]
fn block(
    q: MatRef<'_>,
    kt: MatRef<'_>,
    v: MatRef<'_>,
    (n, _d, t, e): (usize, usize, usize, usize),
    alpha: f32,
    prep: &Prep<'_>,
    out: &mut [f32],
) {
    if t == 0 {
        // Softmax over no keys leaves nothing to weigh: P · V is empty sums.
        out.fill(0.0);
        return;
    }
    // (With d == 0 the GEMM writes zeros: beta is 0 and the sums are empty.)
    // Keys that a `Where` mask replaces for every row of the block (the
    // future of a causal mask, the padding at a sequence's end) are left out
    // of both products when their probabilities come out exactly 0 and V's
    // rows there are finite (0 x inf would be NaN): the same sums up to
    // rounding (the products' and the row sum's order of additions differ
    // with the number of keys), less work. Once a block finds the fill
    // within reach of its scores, the op's other blocks stop trying.
    if let Some((live, fill)) = prep.live_keys(n, t) {
        let finite = (live..t).all(|p| (0..e).all(|c| v.at(p, c).is_finite()));
        if finite {
            let kt_live = MatRef::new(kt.data(), kt.rows(), live, kt.row_stride(), kt.col_stride());
            let v_live = MatRef::new(v.data(), live, e, v.row_stride(), v.col_stride());
            let done = with_scratch(&SCORES, n * live, |sc| {
                block_scores(
                    q,
                    kt_live,
                    v_live,
                    (n, live, e),
                    alpha,
                    prep,
                    Some(fill),
                    sc,
                    out,
                )
            });
            if done {
                return;
            }
            prep.no_skip
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    // Every score is written by the GEMM (beta 0) before it is read.
    with_scratch(&SCORES, n * t, |sc| {
        block_scores(q, kt, v, (n, t, e), alpha, prep, None, sc, out)
    });
}

/// [`block`] with its scores buffer `sc` (`n x t`). With `dropped_fill`,
/// the keys past `t` were left out as masked with that fill: it returns
/// false, having written nothing to `out`, when their probabilities would
/// not be exactly 0 in some row (the fill within 104 of the row's maximum,
/// so e^(fill - max) is not 0 in f32, or a NaN maximum).
#[allow(clippy::too_many_arguments)]
fn block_scores(
    q: MatRef<'_>,
    kt: MatRef<'_>,
    v: MatRef<'_>,
    (n, t, e): (usize, usize, usize),
    alpha: f32,
    prep: &Prep<'_>,
    dropped_fill: Option<f32>,
    sc: &mut [f32],
    out: &mut [f32],
) -> bool {
    sgemm(alpha, Lhs::Mat(q), Rhs::Mat(kt), 0.0, sc, t, None);
    let mut inv_sums = [0f32; MAX_ROWS_ON_STACK];
    let mut inv_heap = Vec::new();
    let inv: &mut [f32] = if n <= MAX_ROWS_ON_STACK {
        &mut inv_sums[..n]
    } else {
        inv_heap.resize(n, 0.0);
        &mut inv_heap
    };
    for (i, row) in sc.chunks_exact_mut(t).enumerate() {
        let max = crate::fastmath::simd(
            #[inline(always)]
            || {
                prep.apply(i, row);
                crate::fastmath::max_of(row)
            },
        );
        if let Some(fill) = dropped_fill {
            if !(fill - max < -104.0) {
                return false;
            }
        }
        inv[i] = 1.0 / crate::fastmath::exp_shift_sum(row, max);
    }
    sgemm(
        1.0,
        Lhs::Mat(MatRef::row_major(sc, n, t)),
        Rhs::Mat(v),
        0.0,
        out,
        e,
        None,
    );
    crate::fastmath::simd(
        #[inline(always)]
        || {
            for (row, &s) in out.chunks_exact_mut(e.max(1)).zip(inv.iter()) {
                row.iter_mut().for_each(|x| *x *= s);
            }
        },
    );
    true
}

/// Rows of a block whose inverse sums live on the stack.
const MAX_ROWS_ON_STACK: usize = 256;

/// The index of the last `c == keep` in `row`, if any: 32 at a time
/// from the end (a causal mask's rows are mostly masked there), where an
/// element-wise reverse search cost 8% of a causal head's time.
fn last_kept(row: &[bool], keep: bool) -> Option<usize> {
    let mut end = row.len();
    while end >= 32 {
        let chunk = &row[end - 32..end];
        if chunk.iter().fold(false, |a, &c| a | (c == keep)) {
            return chunk.iter().rposition(|&c| c == keep).map(|j| end - 32 + j);
        }
        end -= 32;
    }
    row[..end].iter().rposition(|&c| c == keep)
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

    /// See [`Prep::live_keys`]: rows `i0..i0 + n` of batch `b`, `t` keys.
    fn live_keys(&self, b: usize, i0: usize, n: usize, t: usize) -> Option<(usize, f32)> {
        let MaskVals::Where {
            cond,
            fill,
            keep_if_true,
        } = self.vals
        else {
            return None;
        };
        if self.col_stride != 1 {
            return None;
        }
        let mut live = 0;
        // A mask broadcast along the query axis has one row for all.
        let rows = if self.row_stride == 0 { n.min(1) } else { n };
        for i in i0..i0 + rows {
            let base = self.batch_base[b] + i * self.row_stride;
            // A row that keeps no key is all fill: its probabilities are
            // not 0, so nothing is left out.
            let last = last_kept(&cond[base..base + t], keep_if_true)?;
            live = live.max(last + 1);
            if live == t {
                return None;
            }
        }
        Some((live, fill))
    }

    /// Whether a `Where` mask may differ from one query row to the next (it
    /// is not broadcast along the query axis, as a causal mask is not), so
    /// that blocks of fewer rows may leave out more keys.
    fn varies_by_row(&self) -> bool {
        matches!(self.vals, MaskVals::Where { .. }) && self.row_stride != 0 && self.col_stride == 1
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

#[cfg(test)]
mod tests {
    use super::{exact_inverse, last_kept, MaskVals, MaskView};

    /// The keys a block may leave out: after the last one any of its rows
    /// keeps under a causal or padding `Where` mask; none under an additive
    /// mask, when the block's last row keeps every key, or when a row keeps
    /// none.
    #[test]
    fn live_keys_of_causal_and_padding_masks() {
        let s = 40;
        let causal: Vec<bool> = (0..s * s).map(|i| i % s <= i / s).collect();
        let scores = [1, 2, s, s];
        let where_mask = |cond: &'static [bool], ms: &[usize]| {
            MaskView::new(
                MaskVals::Where {
                    cond,
                    fill: f32::MIN,
                    keep_if_true: true,
                },
                ms,
                &scores,
            )
            .unwrap()
        };
        let causal: &'static [bool] = Box::leak(causal.into_boxed_slice());
        let m = where_mask(causal, &[1, 1, s, s]);
        assert_eq!(m.live_keys(1, 0, 16, s), Some((16, f32::MIN)));
        assert_eq!(m.live_keys(0, 16, 8, s), Some((24, f32::MIN)));
        assert_eq!(m.live_keys(0, 32, 8, s), None);
        let pad: Vec<bool> = (0..s).map(|j| j < 29).collect();
        let pad: &'static [bool] = Box::leak(pad.into_boxed_slice());
        let m = where_mask(pad, &[1, 1, 1, s]);
        assert_eq!(m.live_keys(1, 0, s, s), Some((29, f32::MIN)));
        let mut none = vec![true; s * s];
        none[3 * s..4 * s].iter_mut().for_each(|c| *c = false);
        let none: &'static [bool] = Box::leak(none.into_boxed_slice());
        let m = where_mask(none, &[1, 1, s, s]);
        assert_eq!(m.live_keys(0, 0, 8, s), None);
        let add = vec![-1e9f32; s];
        let m = MaskView::new(MaskVals::Add(&add), &[1, 1, 1, s], &scores).unwrap();
        assert_eq!(m.live_keys(0, 0, 8, s), None);
    }

    #[test]
    fn last_kept_finds_the_last_match() {
        for len in [0usize, 1, 31, 32, 33, 64, 100] {
            for at in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                for keep in [true, false] {
                    let mut row = vec![!keep; len];
                    if let Some(a) = at.filter(|&a| a < len) {
                        row[a] = keep;
                        if a > 3 {
                            row[a - 3] = keep;
                        }
                    }
                    let want = row.iter().rposition(|&c| c == keep);
                    assert_eq!(
                        last_kept(&row, keep),
                        want,
                        "len {len} at {at:?} keep {keep}"
                    );
                }
            }
        }
    }

    #[test]
    fn only_normal_powers_of_two_have_exact_inverses() {
        for c in [1.0f32, 8.0, 0.125, -4.0, 2f32.powi(100)] {
            assert!(exact_inverse(c), "{c}");
            for x in [1.0f32, 3.7, -1e-30, 6.5e37, 1.0e-38] {
                assert_eq!(x * (1.0 / c), x / c, "{x} / {c}");
            }
        }
        for c in [
            3.0f32,
            8.000001,
            0.0,
            f32::INFINITY,
            f32::NAN,
            2f32.powi(127),
            1e-39,
        ] {
            assert!(!exact_inverse(c), "{c}");
        }
    }
}
