//! Channels-last regions: chains of depthwise and pointwise convs (a
//! MobileNet's body) run on `[N, H, W, C]` tensors.
//!
//! On NCHW tensors a depthwise conv over small planes (7x7 to 28x28) spends
//! most of its time transposing 16 channels into vector lanes and back, and
//! a pointwise conv is a product whose right operand, X, is packed on every
//! run and whose 49 or 196 columns waste part of each 64-wide GEMM tile.
//! Channels-last, 16 neighbouring channels are one vector as stored, and a
//! pointwise conv is a plain product whose rows are every image's
//! positions, `[N*H*W, C] x [C, M]`, with X read in place and W packed once.
//!
//! A region is a connected set of 2-D convs (plain or `FusedOp::Conv`) on
//! planes of at most 14x14 (28x28 for a known batch of up to 8, where the
//! region holds a depthwise conv with a 28x28 output: [`admit_mid_planes`])
//! that are
//! depthwise (one input and one output
//! channel per group), pointwise (1x1, stride 1, no padding, one group) or
//! dense (one group, a wider window, 8+ input and 64+ output channels:
//! ResNet's 3x3 convs), linked through their X or residual inputs. A region
//! of two or more is converted when its edges need at most two Transposes
//! per pointwise or dense conv and four per depthwise one inside
//! ([`worth_converting`]): then each value entering it is transposed to
//! channels-last once, each leaving it back once (or, when only
//! GlobalAveragePools read it, averaged channels-last), depthwise and dense convs
//! become `FusedOp::ConvNhwc` and pointwise ones `FusedOp::MatMul` over a
//! transposed copy of W (`[C, M]`), and every value keeps its name and
//! contents outside the region. (A dense conv's GEMM reads channels-last X
//! in place and writes channels-last Y, so inside a region it needs none of
//! the two transposes its NCHW path makes.)

use crate::util::{add_constant, constant, f32_tensor, fresh_name, shape_of, Index};
use crate::PassCtx;
use kiln_ir::{AutoPad, ConvAttrs, DType, Dim, FusedAct, FusedOp, Graph, Node, Op, ValueType};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// The largest input or output plane (H x W) of a conv in a region, but for
/// the mid planes of [`MAX_MID_PLANE`].
const MAX_PLANE: usize = 14 * 14;

/// The largest plane of a conv joining a region through a depthwise conv
/// ([`admit_mid_planes`]): 28x28. A MobileNet's 28x28 blocks ran faster
/// channels-last (MobileNetV2 at batch 1 on 2 threads, medians of 8-10
/// alternating profiled runs: their convs 420-454 -> 396-404 us, the
/// Transpose into the region, now 3x bigger, +5 us; the model 1.6-3%
/// faster; at batch 8, once the channels-last depthwise kernel grouped its
/// blocks per task and read its output lines ahead, 1.2% faster in 8 of 8
/// alternating runs: the expansions 390-410 -> 240 us, the depthwise convs
/// 210-230 -> 245-310, the Transpose in +80). Without a depthwise conv, the
/// 28x28 stage of ResNet-50 was slower channels-last (its pointwise convs
/// joining the 14x14 region: +2%), so there they stay NCHW.
const MAX_MID_PLANE: usize = 28 * 28;

/// The largest known batch whose convs join a region through mid planes.
const MAX_MID_BATCH: usize = 8;

/// What a candidate conv becomes.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Depthwise,
    Pointwise,
    /// One group, a window wider than 1x1 (any stride, padding, dilation):
    /// `FusedOp::ConvNhwc`, which the CPU backend runs as a GEMM gathering
    /// each tap's channels from X where they lie.
    Dense,
}

/// A candidate's planes against [`MAX_PLANE`].
#[derive(Clone, Copy, PartialEq, Debug)]
enum Size {
    /// Input and output planes up to [`MAX_PLANE`].
    Small,
    /// The input plane bigger (a stride-2 conv from 28x28 to 14x14).
    MidIn,
    /// The output plane bigger.
    MidOut,
}

pub fn run(g: &mut Graph, _ctx: &PassCtx) -> usize {
    let Some(ix) = Index::new(g) else {
        return 0;
    };
    let found: HashMap<usize, (Kind, Size)> = (0..g.nodes.len())
        .filter_map(|i| candidate(g, &ix, i).map(|k| (i, k)))
        .collect();
    let kinds = admit_mid_planes(g, &ix, &found);
    if kinds.is_empty() {
        return 0;
    }
    let mut converted = 0;
    for nodes in &regions(g, &ix, &kinds) {
        let Some(edges) = paying_edges(g, &ix, &kinds, nodes) else {
            continue;
        };
        // Weights only this region's pointwise convs read are replaced by
        // their transposes under the same name (no second copy).
        let own: HashSet<String> = nodes
            .iter()
            .filter(|i| kinds[i] == Kind::Pointwise)
            .filter_map(|&i| g.nodes[i].input(1))
            .filter(|w| ix.readers(w).len() == 1 && !ix.graph_inputs.contains(*w))
            .map(str::to_string)
            .collect();
        convert(g, nodes, &kinds, &edges, &own);
        converted += nodes.len();
    }
    converted
}

/// Whether a region of `pointwise` and `depthwise` convs pays for the
/// `transposes` at its edges: at least two convs, and at most two
/// Transposes per pointwise conv and four per depthwise one. Measured on
/// 2 threads: MobileNetV2's 14x14 and 7x7 layers (2 Transposes for 27
/// convs) 2.36 -> 2.28 ms at batch 1; ResNet-50's 14x14 and 7x7 stages,
/// whose 3x3 convs stay NCHW (21 Transposes for 17 pointwise convs, each
/// 0.04-0.05 ms faster), 140.7 -> 136.0 ms at batch 8. A transposed 14x14
/// plane costs a few microseconds; a pointwise conv there gains tens.
fn worth_converting(pointwise: usize, depthwise: usize, transposes: usize) -> bool {
    pointwise + depthwise >= 2 && transposes <= 2 * pointwise + 4 * depthwise
}

/// A Conv's attributes and fused activation (Identity for a plain Conv).
fn conv_of(op: &Op) -> Option<(&ConvAttrs, FusedAct)> {
    match op {
        Op::Conv(conv) => Some((conv, FusedAct::Identity)),
        Op::Fused(FusedOp::Conv { conv, act }) => Some((conv, *act)),
        _ => None,
    }
}

/// The inputs through which a candidate joins a region: X and the residual.
fn linked_inputs(n: &Node) -> impl Iterator<Item = &str> {
    [n.input(0), n.input(3)].into_iter().flatten()
}

/// Whether node `i` can run channels-last, and as what: a fused f32 2-D
/// conv with a constant W, X of known rank 4 and channel count, and an
/// output of known rank 4; and whether a plane of it is bigger than
/// [`MAX_PLANE`] (up to [`MAX_MID_PLANE`]).
fn candidate(g: &Graph, ix: &Index, i: usize) -> Option<(Kind, Size)> {
    let n = &g.nodes[i];
    let (conv, _) = conv_of(&n.op)?;
    let out = n.outputs.first()?.as_deref()?;
    if n.outputs.len() != 1 {
        return None;
    }
    let xs = shape(g, n.input(0)?)?;
    let ys = shape(g, out)?;
    if xs.len() != 4 || ys.len() != 4 || g.value_type(out)?.dtype != DType::F32 {
        return None;
    }
    let c = xs[1].known()?;
    // Big planes stay NCHW: there the NCHW kernels stream whole rows
    // (MobileNetV2's 112x112 and 56x56 layers ran 1.2-2x slower
    // channels-last), and the Transpose into the region is smaller later.
    // 1x1 planes (squeeze-and-excitation convs) are stored the same either
    // way: nothing to gain there.
    let plane = |s: &[Dim]| Some(s[2].known()? * s[3].known()?);
    let (x_plane, y_plane) = (plane(&xs)?, plane(&ys)?);
    if x_plane > MAX_MID_PLANE || !(2..=MAX_MID_PLANE).contains(&y_plane) {
        return None;
    }
    let size = if y_plane > MAX_PLANE {
        Size::MidOut
    } else if x_plane > MAX_PLANE {
        Size::MidIn
    } else {
        Size::Small
    };
    // Mid planes for the batches measured (1 and 8; see MAX_MID_PLANE).
    // Far bigger batches leave MobileNetV2's 28x28 expansions to the
    // one-kernel pointwise + depthwise pass (`pw_dw`), whose expansion then
    // no longer fits the caches.
    if size != Size::Small && !xs[0].known().is_some_and(|n| n <= MAX_MID_BATCH) {
        return None;
    }
    let w = constant(g, ix, n.input(1)?)?;
    if w.dtype() != DType::F32 || w.rank() != 4 || c == 0 {
        return None;
    }
    let ws = w.shape();
    if let Some(res) = n.input(3) {
        if shape(g, res)? != ys {
            return None;
        }
    }
    if conv.group == c && ws[0] == c && ws[1] == 1 {
        return Some((Kind::Depthwise, size));
    }
    let ones = |v: &[usize]| v.iter().all(|&d| d == 1);
    if conv.group == 1
        && ws[1] == c
        && ws[2] == 1
        && ws[3] == 1
        && ones(&conv.strides)
        && ones(&conv.dilations)
        && conv.pads.iter().all(|&p| p == 0)
        && matches!(conv.auto_pad, AutoPad::NotSet | AutoPad::Valid)
        && conv_bias_ok(g, n, ws[0])
    {
        return Some((Kind::Pointwise, size));
    }
    // The sizes the backend's gathered product is chosen for on NCHW
    // tensors too (its `gathered_applies`): at least 8 input channels (a
    // tap's segment) and 64 output channels (a full AVX-512 tile).
    if conv.group == 1
        && ws[1] == c
        && (ws[2] > 1 || ws[3] > 1)
        && c >= 8
        && ws[0] >= 64
        && !winograd_candidate(conv, ws, &ys)
        && conv_bias_ok(g, n, ws[0])
    {
        return Some((Kind::Dense, size));
    }
    None
}

/// Regions: candidates linked through a value one produces and another
/// reads as X or residual, each in node order, ordered by first node.
fn regions(g: &Graph, ix: &Index, kinds: &HashMap<usize, Kind>) -> Vec<Vec<usize>> {
    let mut parent: HashMap<usize, usize> = kinds.keys().map(|&i| (i, i)).collect();
    fn root(p: &mut HashMap<usize, usize>, mut i: usize) -> usize {
        while p[&i] != i {
            let up = p[&p[&i]];
            p.insert(i, up);
            i = up;
        }
        i
    }
    for &i in kinds.keys() {
        for v in linked_inputs(&g.nodes[i]) {
            if let Some(j) = ix.producer_of(v).filter(|j| kinds.contains_key(j)) {
                let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                parent.insert(a, b);
            }
        }
    }
    let mut members: Vec<usize> = kinds.keys().copied().collect();
    members.sort_unstable();
    let mut by_root: HashMap<usize, usize> = HashMap::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for i in members {
        let r = root(&mut parent, i);
        let k = *by_root.entry(r).or_insert_with(|| {
            out.push(Vec::new());
            out.len() - 1
        });
        out[k].push(i);
    }
    out
}

/// A region's edges, where its convs pay for the Transposes there
/// ([`worth_converting`]; dense convs count as pointwise ones).
fn paying_edges(
    g: &Graph,
    ix: &Index,
    kinds: &HashMap<usize, Kind>,
    nodes: &[usize],
) -> Option<Edges> {
    let edges = edges(g, ix, nodes);
    let depthwise = nodes.iter().filter(|i| kinds[i] == Kind::Depthwise).count();
    let transposes = edges.entering.len() + edges.leaving.len();
    worth_converting(nodes.len() - depthwise, depthwise, transposes).then_some(edges)
}

/// The candidates that may join a region: those on planes up to
/// [`MAX_PLANE`], and those on bigger ones (up to [`MAX_MID_PLANE`]) whose
/// region, formed from all candidates, holds a depthwise conv with such an
/// output plane (a MobileNet's 28x28 blocks, not ResNet-50's 28x28 stage)
/// and pays for its Transposes; where it does not, its small-plane members
/// still form their regions as they would alone.
fn admit_mid_planes(
    g: &Graph,
    ix: &Index,
    found: &HashMap<usize, (Kind, Size)>,
) -> HashMap<usize, Kind> {
    let all: HashMap<usize, Kind> = found.iter().map(|(&i, &(k, _))| (i, k)).collect();
    let admitted: HashSet<usize> = regions(g, ix, &all)
        .into_iter()
        .filter(|r| {
            r.iter()
                .any(|i| found[i] == (Kind::Depthwise, Size::MidOut))
                && paying_edges(g, ix, &all, r).is_some()
        })
        .flatten()
        .collect();
    found
        .iter()
        .filter(|&(i, &(_, size))| size == Size::Small || admitted.contains(i))
        .map(|(&i, &(kind, _))| (i, kind))
        .collect()
}

/// Whether the CPU backend would run this conv as Winograd F(4x4, 3x3) on
/// NCHW tensors (its `winograd::applies`, without the CPU check): 3x3,
/// stride and dilation 1, 16+ channels each way, 16+ 4x4 output tiles.
/// That beats the channels-last gathered product (ResNet-50's 256-channel
/// 3x3 on 14x14: 0.33 against 0.51 ms), so such a conv stays outside.
/// (The constants are the backend's; change both together.)
fn winograd_candidate(conv: &ConvAttrs, ws: &[usize], ys: &[Dim]) -> bool {
    let ones = |v: &[usize]| v.iter().all(|&d| d == 1);
    let tiles = match (ys[2].known(), ys[3].known()) {
        (Some(h), Some(w)) => h.div_ceil(4) * w.div_ceil(4),
        _ => 0,
    };
    ws[2] == 3
        && ws[3] == 3
        && ones(&conv.strides)
        && ones(&conv.dilations)
        && ws[0] >= 16
        && ws[1] >= 16
        && tiles >= 16
}

/// `v`'s shape: as declared or inferred (a graph output may be declared
/// without one).
fn shape(g: &Graph, v: &str) -> Option<Vec<Dim>> {
    shape_of(g, v).or_else(|| g.value_types.get(v)?.shape.clone())
}

/// A pointwise conv's bias, if any, is `[M]`: FusedMatMul's bias along the
/// last axis.
fn conv_bias_ok(g: &Graph, n: &Node, m: usize) -> bool {
    match n.input(2) {
        None => true,
        Some(b) => shape_of(g, b).is_some_and(|s| s == [Dim::Known(m)]),
    }
}

/// The values crossing a region's edge: read by a member as X or residual
/// but made outside, and made by a member but read outside (or seen outside
/// the graph).
struct Edges {
    entering: BTreeSet<String>,
    leaving: BTreeSet<String>,
    /// Of `leaving`, those only GlobalAveragePools read (and nothing sees
    /// outside the graph): they leave as a mean over the channels-last
    /// positions, `[N, 1, 1, C]`, stored as the pool's `[N, C, 1, 1]`, so
    /// no Transpose (MobileNetV2's last 7x7 value: 1280 x 49 floats, 251
    /// KB, transposed per image only to be averaged). With each its channel
    /// count C.
    pooled: BTreeMap<String, usize>,
}

fn edges(g: &Graph, ix: &Index, nodes: &[usize]) -> Edges {
    let inside = |j: usize| nodes.contains(&j);
    let mut entering = BTreeSet::new();
    let mut leaving = BTreeSet::new();
    for &i in nodes {
        for v in linked_inputs(&g.nodes[i]) {
            if !ix.producer_of(v).is_some_and(inside) {
                entering.insert(v.to_string());
            }
        }
        for v in g.nodes[i].present_outputs() {
            // Read by a non-member, or by a member other than as X/residual.
            let outside_reader = ix.readers(v).iter().any(|&j| {
                !inside(j)
                    || g.nodes[j]
                        .inputs
                        .iter()
                        .enumerate()
                        .any(|(k, name)| name.as_deref() == Some(v) && k != 0 && k != 3)
            });
            if outside_reader || ix.is_pinned(v) {
                leaving.insert(v.to_string());
            }
        }
    }
    let pooled = leaving
        .iter()
        .filter_map(|v| {
            let readers = ix.readers(v);
            let c = shape(g, v).and_then(|s| s.get(1)?.known())?;
            let only_pools = !ix.is_pinned(v)
                && !readers.is_empty()
                && readers.iter().all(|&j| {
                    let n = &g.nodes[j];
                    matches!(n.op, Op::GlobalAveragePool)
                        && n.inputs.len() == 1
                        && n.input(0) == Some(v.as_str())
                        && n.outputs.len() == 1
                });
            only_pools.then(|| (v.clone(), c))
        })
        .collect();
    Edges {
        entering,
        leaving,
        pooled,
    }
}

/// `[N, C, H, W]` as `[N, H, W, C]`.
fn to_last(s: &[Dim]) -> Vec<Dim> {
    vec![s[0].clone(), s[2].clone(), s[3].clone(), s[1].clone()]
}

fn convert(
    g: &mut Graph,
    nodes: &[usize],
    kinds: &HashMap<usize, Kind>,
    e: &Edges,
    own: &HashSet<String>,
) {
    // Channels-last names: a Transpose's output for values entering, a
    // fresh name for every member's output.
    let mut last: HashMap<String, String> = HashMap::new();
    let mut new_nodes = Vec::new();
    let typed = |g: &Graph, v: &str| Some(ValueType::new(DType::F32, Some(to_last(&shape(g, v)?))));
    for v in &e.entering {
        let name = fresh_name(g, &format!("{v}_nhwc"));
        if let Some(t) = typed(g, v) {
            g.value_types.insert(name.clone(), t);
        }
        new_nodes.push(Node {
            name: fresh_name(g, &format!("{v}_to_nhwc")),
            op: Op::Transpose {
                perm: Some(vec![0, 2, 3, 1]),
            },
            inputs: vec![Some(v.clone())],
            outputs: vec![Some(name.clone())],
        });
        last.insert(v.clone(), name);
    }
    for &i in nodes {
        let out = g.nodes[i].outputs[0].clone().unwrap_or_default();
        let name = fresh_name(g, &format!("{out}_nhwc"));
        if let Some(t) = typed(g, &out) {
            g.value_types.insert(name.clone(), t);
        }
        last.insert(out, name);
    }
    let mut w_t: HashMap<String, String> = HashMap::new();
    for &i in nodes {
        let n = g.nodes[i].clone();
        let Some((conv, act)) = conv_of(&n.op) else {
            continue;
        };
        let conv = conv.clone();
        let mut inputs = n.inputs.clone();
        for k in [0, 3] {
            if let Some(Some(v)) = inputs.get_mut(k) {
                *v = last[v.as_str()].clone();
            }
        }
        let op = match kinds[&i] {
            Kind::Depthwise | Kind::Dense => Op::Fused(FusedOp::ConvNhwc { conv, act }),
            Kind::Pointwise => {
                let w = n.input(1).unwrap_or_default().to_string();
                let wt = match w_t.get(&w) {
                    Some(t) => t.clone(),
                    None => {
                        let t = transposed_weight(g, &w, own.contains(&w));
                        w_t.insert(w.clone(), t.clone());
                        t
                    }
                };
                inputs[1] = Some(wt);
                Op::Fused(FusedOp::MatMul { act })
            }
        };
        let out = n.outputs[0].clone().unwrap_or_default();
        let node = &mut g.nodes[i];
        node.op = op;
        node.inputs = inputs;
        node.outputs = vec![Some(last[&out].clone())];
        if let Some(&c) = e.pooled.get(&out) {
            pool_channels_last(g, &out, &last[&out], c, &mut new_nodes);
        } else if e.leaving.contains(&out) {
            new_nodes.push(Node {
                name: fresh_name(g, &format!("{out}_to_nchw")),
                op: Op::Transpose {
                    perm: Some(vec![0, 3, 1, 2]),
                },
                inputs: vec![Some(last[&out].clone())],
                outputs: vec![Some(out.clone())],
            });
        }
    }
    g.nodes.extend(new_nodes);
}

/// Rewrites every GlobalAveragePool of `out` (see `Edges::pooled`) to read
/// its channels-last form `nhwc` instead: a ReduceMean over the positions
/// (axes 1 and 2, kept), `[N, 1, 1, C]`, then a Reshape to the pool's
/// `[N, C, 1, 1]` (the same values in the same order).
fn pool_channels_last(g: &mut Graph, out: &str, nhwc: &str, c: usize, new_nodes: &mut Vec<Node>) {
    let readers: Vec<usize> = (0..g.nodes.len())
        .filter(|&j| g.nodes[j].input(0) == Some(out))
        .collect();
    let axes = add_constant(g, "pool_axes", i64_tensor(vec![1, 2]));
    // 0: N as it is (0 images too).
    let dims = add_constant(g, "pool_dims", i64_tensor(vec![0, c as i64, 1, 1]));
    for j in readers {
        let pooled_out = g.nodes[j].outputs[0].clone().unwrap_or_default();
        let mean = fresh_name(g, &format!("{pooled_out}_nhwc"));
        if let Some(s) = shape(g, nhwc) {
            let t = vec![s[0].clone(), Dim::Known(1), Dim::Known(1), s[3].clone()];
            g.value_types
                .insert(mean.clone(), ValueType::new(DType::F32, Some(t)));
        }
        let name = g.nodes[j].name.clone();
        let n = &mut g.nodes[j];
        n.op = Op::Reduce {
            op: kiln_ir::ReduceOp::Mean,
            keepdims: true,
            noop_with_empty_axes: false,
        };
        n.inputs = vec![Some(nhwc.to_string()), Some(axes.clone())];
        n.outputs = vec![Some(mean.clone())];
        new_nodes.push(Node {
            name: fresh_name(g, &format!("{name}_to_nchw")),
            op: Op::Reshape { allowzero: false },
            inputs: vec![Some(mean), Some(dims.clone())],
            outputs: vec![Some(pooled_out)],
        });
    }
}

fn i64_tensor(v: Vec<i64>) -> kiln_ir::Tensor {
    let n = v.len();
    kiln_ir::Tensor::from_vec(vec![n], v).expect("a vector's shape matches its length")
}

/// Pointwise W `[M, C, 1, 1]` transposed to `[C, M]`: under W's own name
/// when `in_place` (nothing else reads W), else as a new constant.
fn transposed_weight(g: &mut Graph, w: &str, in_place: bool) -> String {
    let t = g.initializers[w].clone();
    let (m, c) = (t.shape()[0], t.shape()[1]);
    let v = t.as_slice::<f32>().unwrap_or_default();
    let mut out = vec![0f32; m * c];
    for (mi, row) in v.chunks_exact(c).enumerate() {
        for (ci, &x) in row.iter().enumerate() {
            out[ci * m + mi] = x;
        }
    }
    let t = f32_tensor(vec![c, m], out);
    if in_place {
        g.initializers.insert(w.to_string(), std::sync::Arc::new(t));
        return w.to_string();
    }
    add_constant(g, &format!("{w}_t"), t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::test_util::{conv2d as conv, fused_conv as fused, RELU6 as CLIP};
    use kiln_ir::Op;

    /// `blocks` MobileNetV2 blocks on `[2, 16, hw, hw]`: a fused 1x1 expand
    /// to 32 channels with Clip, a fused 3x3 depthwise (stride 1, or the
    /// given one in the first block) with Clip, and a plain 1x1 project
    /// back to 16, plus the block's input as residual when the shapes allow.
    fn mobilenet_blocks(hw: usize, blocks: usize, first_stride: usize, dil: usize) -> Graph {
        mobilenet_blocks_of(2, hw, blocks, first_stride, dil)
    }

    /// [`mobilenet_blocks`] over a batch of `n`.
    fn mobilenet_blocks_of(
        n: usize,
        hw: usize,
        blocks: usize,
        first_stride: usize,
        dil: usize,
    ) -> Graph {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[n, 16, hw, hw]);
        let mut cur = "x".to_string();
        for i in 0..blocks {
            let s = if i == 0 { first_stride } else { 1 };
            let we = b.init_rand(&format!("we{i}"), &[32, 16, 1, 1], -0.5, 0.5);
            let be = b.init_rand(&format!("be{i}"), &[32], -0.5, 0.5);
            let wd = b.init_rand(&format!("wd{i}"), &[32, 1, 3, 3], -0.5, 0.5);
            let bd = b.init_rand(&format!("bd{i}"), &[32], -0.5, 0.5);
            let wp = b.init_rand(&format!("wp{i}"), &[16, 32, 1, 1], -0.5, 0.5);
            let bp = b.init_rand(&format!("bp{i}"), &[16], -0.5, 0.5);
            let (e, d, p) = (format!("e{i}"), format!("d{i}"), format!("p{i}"));
            b.node(fused(conv(1, 1, 1, 0, 1), CLIP), &[&cur, &we, &be], &[&e]);
            b.node(
                fused(conv(32, 3, s, dil, dil), CLIP),
                &[&e, &wd, &bd],
                &[&d],
            );
            if s == 1 {
                let project = fused(conv(1, 1, 1, 0, 1), FusedAct::Identity);
                b.node(project, &[&d, &wp, &bp, &cur], &[&p]);
            } else {
                b.node(Op::Conv(conv(1, 1, 1, 0, 1)), &[&d, &wp, &bp], &[&p]);
            }
            cur = p;
        }
        b.output(&cur, DType::F32);
        b.finish()
    }

    #[test]
    fn converts_a_chain_of_depthwise_blocks() {
        for (hw, stride, dil) in [(7, 1, 1), (14, 2, 1), (9, 1, 2)] {
            let g = mobilenet_blocks(hw, 3, stride, dil);
            let (after, n) = check_pass(&g, run);
            assert_eq!(n, 9, "{hw}x{hw}: every conv joins the region");
            assert_eq!(count_op(&after, "FusedConvNhwc"), 3);
            assert_eq!(count_op(&after, "FusedMatMul"), 6);
            // One Transpose in, one out; the output keeps its name.
            assert_eq!(count_op(&after, "Transpose"), 2);
            assert_eq!(after.outputs, g.outputs);
        }
    }

    /// `blocks` ResNet bottlenecks on `[2, 64, hw, hw]`: 1x1 64 -> 32 with
    /// Relu, 3x3 32 -> 64 (the given stride in the first block) with Relu,
    /// 1x1 64 -> 64 plus the block's input where the shapes allow.
    fn bottlenecks(hw: usize, blocks: usize, first_stride: usize) -> Graph {
        bottlenecks_of(2, hw, blocks, first_stride)
    }

    /// [`bottlenecks`] over a batch of `n`.
    fn bottlenecks_of(n: usize, hw: usize, blocks: usize, first_stride: usize) -> Graph {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[n, 64, hw, hw]);
        let mut cur = "x".to_string();
        for i in 0..blocks {
            let s = if i == 0 { first_stride } else { 1 };
            let w1 = b.init_rand(&format!("w1_{i}"), &[32, 64, 1, 1], -0.3, 0.3);
            let w2 = b.init_rand(&format!("w2_{i}"), &[64, 32, 3, 3], -0.3, 0.3);
            let b2 = b.init_rand(&format!("b2_{i}"), &[64], -0.3, 0.3);
            let w3 = b.init_rand(&format!("w3_{i}"), &[64, 64, 1, 1], -0.3, 0.3);
            let (r, d, p) = (format!("r{i}"), format!("d{i}"), format!("p{i}"));
            let relu = FusedAct::Relu;
            b.node(fused(conv(1, 1, 1, 0, 1), relu), &[&cur, &w1], &[&r]);
            b.node(fused(conv(1, 3, s, 1, 1), relu), &[&r, &w2, &b2], &[&d]);
            if s == 1 {
                b.node(
                    fused(conv(1, 1, 1, 0, 1), relu),
                    &[&d, &w3, "", &cur],
                    &[&p],
                );
            } else {
                b.node(fused(conv(1, 1, 1, 0, 1), relu), &[&d, &w3], &[&p]);
            }
            cur = p;
        }
        b.output(&cur, DType::F32);
        b.finish()
    }

    #[test]
    fn converts_bottlenecks_with_their_dense_convs() {
        // 7x7, and 14x14 -> 7x7 through a stride-2 3x3.
        for (hw, stride) in [(7, 1), (14, 2)] {
            let g = bottlenecks(hw, 2, stride);
            let (after, n) = check_pass(&g, run);
            assert_eq!(n, 6, "{hw}x{hw}: every conv joins the region");
            assert_eq!(count_op(&after, "FusedConvNhwc"), 2);
            assert_eq!(count_op(&after, "FusedMatMul"), 4);
            // x in, p1 out. (p0 is block 1's X and its residual, which
            // has no bias before it: a residual at input 3 after an absent
            // input 2 stays inside.)
            assert_eq!(count_op(&after, "Transpose"), 2);
        }
        // On 14x14 at stride 1 the 3x3 convs have 16 Winograd tiles: they
        // stay NCHW (Winograd is faster there), the 1x1 convs around them
        // are lone or pairs whose edges cost more than they gain.
        let g = bottlenecks(14, 2, 1);
        let (after, _) = check_pass(&g, run);
        assert_eq!(count_op(&after, "FusedConvNhwc"), 0);
    }

    #[test]
    fn converts_28x28_depthwise_blocks() {
        // 28x28 blocks, of one image and of two: every conv joins the region.
        for g in [
            mobilenet_blocks_of(1, 28, 3, 1, 1),
            mobilenet_blocks(28, 3, 1, 1),
        ] {
            let (after, n) = check_pass(&g, run);
            assert_eq!(n, 9);
            assert_eq!(count_op(&after, "Transpose"), 2);
        }
        // A stride-2 depthwise conv from 28x28 to 14x14 does not bring
        // itself or its 28x28 expansion in (no depthwise conv with a 28x28
        // output): the region starts at the projection after it.
        let g = mobilenet_blocks_of(1, 28, 3, 2, 1);
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 7);
        assert_eq!(count_op(&after, "FusedConvNhwc"), 2);
    }

    #[test]
    fn leaves_big_planes_and_lone_convs() {
        // 28x28 planes of 16 images (past MAX_MID_BATCH); 56x56 planes.
        let g = mobilenet_blocks_of(16, 28, 3, 1, 1);
        assert_eq!(check_pass(&g, run), (g.clone(), 0));
        let g = mobilenet_blocks_of(1, 56, 2, 1, 1);
        assert_eq!(check_pass(&g, run), (g.clone(), 0));
        // 28x28 convs of one image without a depthwise conv among them
        // (ResNet-50's 28x28 stage).
        let g = bottlenecks_of(1, 28, 2, 1);
        assert_eq!(check_pass(&g, run), (g.clone(), 0));
        // A depthwise conv alone between two Relus: nothing to share its
        // two Transposes with.
        let mut b = Builder::new();
        b.input("x", DType::F32, &[1, 32, 7, 7]);
        let w = b.init_rand("w", &[32, 1, 3, 3], -0.5, 0.5);
        b.node(Op::Unary(kiln_ir::UnaryOp::Relu), &["x"], &["r"]);
        b.node(fused(conv(32, 3, 1, 1, 1), CLIP), &["r", &w], &["d"]);
        b.node(Op::Unary(kiln_ir::UnaryOp::Relu), &["d"], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        assert_eq!(check_pass(&g, run), (g.clone(), 0));
    }

    #[test]
    fn transposes_at_the_edges_are_bounded_per_conv() {
        assert!(!worth_converting(1, 0, 2) && !worth_converting(0, 1, 2));
        assert!(worth_converting(2, 0, 4) && !worth_converting(2, 0, 5));
        assert!(worth_converting(1, 1, 6) && !worth_converting(1, 1, 7));
        // One MobileNetV2 block whose expand and depthwise outputs Relus
        // outside also read: x in; p0, e0 and d0 out. 4 Transposes, within
        // the 8 that 2 pointwise and 1 depthwise conv allow.
        let mut g = mobilenet_blocks(7, 1, 1, 1);
        for v in ["e0", "d0"] {
            g.nodes.push(Node {
                name: format!("side_{v}"),
                op: Op::Unary(kiln_ir::UnaryOp::Relu),
                inputs: vec![Some(v.to_string())],
                outputs: vec![Some(format!("side_{v}"))],
            });
            g.outputs.push(kiln_ir::ValueInfo {
                name: format!("side_{v}"),
                ty: ValueType::new(DType::F32, None),
            });
        }
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 3);
        assert_eq!(count_op(&after, "Transpose"), 4);
    }

    #[test]
    fn a_value_only_pooled_leaves_without_a_transpose() {
        // The blocks' last value read only by a GlobalAveragePool: a mean
        // over the channels-last positions instead of a Transpose. When the
        // value is also a graph output, it is transposed back for that.
        // So is a value another node reads as well.
        for (also_output, also_read) in [(false, false), (true, false), (false, true)] {
            let mut g = mobilenet_blocks(7, 2, 1, 1);
            g.nodes.push(Node {
                name: "pool".into(),
                op: Op::GlobalAveragePool,
                inputs: vec![Some("p1".into())],
                outputs: vec![Some("pooled".into())],
            });
            let info = |name: &str| kiln_ir::ValueInfo {
                name: name.into(),
                ty: ValueType::new(DType::F32, None),
            };
            if !also_output {
                g.outputs.clear();
            }
            g.outputs.push(info("pooled"));
            if also_read {
                g.nodes.push(Node {
                    name: "side".into(),
                    op: Op::Unary(kiln_ir::UnaryOp::Relu),
                    inputs: vec![Some("p1".into())],
                    outputs: vec![Some("side".into())],
                });
                g.outputs.push(info("side"));
            }
            let (after, n) = check_pass(&g, run);
            assert_eq!(n, 6);
            let means = usize::from(!also_output && !also_read);
            let what = format!("output {also_output}, read {also_read}");
            assert_eq!(count_op(&after, "Transpose"), 2 - means, "{what}");
            assert_eq!(count_op(&after, "ReduceMean"), means, "{what}");
            assert_eq!(count_op(&after, "GlobalAveragePool"), 1 - means, "{what}");
        }
    }

    #[test]
    fn values_read_outside_the_region_keep_their_layout() {
        // An intermediate that is also a graph output, and one read by a
        // node outside the region: both come back NCHW under their names.
        // (Four blocks: four edges need four depthwise convs.)
        let mut g = mobilenet_blocks(7, 4, 1, 1);
        g.outputs.push(kiln_ir::ValueInfo {
            name: "d1".into(),
            ty: ValueType::new(DType::F32, None),
        });
        g.nodes.push(Node {
            name: "side".into(),
            op: Op::Unary(kiln_ir::UnaryOp::Relu),
            inputs: vec![Some("e2".into())],
            outputs: vec![Some("side".into())],
        });
        g.outputs.push(kiln_ir::ValueInfo {
            name: "side".into(),
            ty: ValueType::new(DType::F32, None),
        });
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 12);
        // In, and out for p3, d1 and e2.
        assert_eq!(count_op(&after, "Transpose"), 4);
    }
}
