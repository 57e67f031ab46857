//! Normalization recognition over the last axis.
//!
//! - LayerNormalization from `ReduceMean -> Sub -> Pow 2 (or Mul d*d) ->
//!   ReduceMean -> Add eps -> Sqrt -> Div [-> Mul gamma] [-> Add beta]`.
//! - RMSNormalization from `x * 1/Sqrt(ReduceMean(x^2) + eps) [* gamma]`, with
//!   `Div(x, Sqrt(..))`, `Mul(x, Reciprocal(Sqrt(..)))` or
//!   `Mul(x, Div(1, Sqrt(..)))` for the scaling.
//!
//! Both need f32 data whose last dim is known, ReduceMeans over exactly the
//! last axis keeping dims, a scalar constant eps, constant gamma/beta that
//! vary only along the last axis, and intermediates read only inside the
//! pattern. gamma/beta are reshaped to `[D]` (new constants) when they carry
//! leading 1-dims.

use crate::util::{
    add_constant, constant, dtype_of, f32_tensor, is_binary, other_input, remove_nodes,
    rewrite_each, same_shape, scalar_const, shape_of, single_output, Index,
};
use crate::PassCtx;
use kiln_ir::{AttnOp, BinaryOp, DType, Dim, Graph, Node, Op, ReduceOp, Tensor, UnaryOp};

pub fn run(g: &mut Graph, _ctx: &PassCtx) -> usize {
    rewrite_each(
        g,
        |g, ix, i| layer_norm_at(g, ix, i).or_else(|| rms_norm_at(g, ix, i)),
        apply,
    )
}

/// A parameter of the new node: an existing constant or a new one.
enum Param {
    Value(String),
    New(String, Tensor),
}

struct Match {
    op: Op,
    x: String,
    params: Vec<Option<Param>>,
    last: usize,
    remove: Vec<usize>,
}

fn apply(g: &mut Graph, m: Match) {
    let mut inputs = vec![Some(m.x)];
    for p in m.params {
        inputs.push(p.map(|p| match p {
            Param::Value(v) => v,
            Param::New(base, t) => add_constant(g, &base, t),
        }));
    }
    while inputs.last() == Some(&None) {
        inputs.pop();
    }
    let node = &mut g.nodes[m.last];
    node.op = m.op;
    node.inputs = inputs;
    remove_nodes(g, &m.remove);
}

/// Whether node `n` is ReduceMean over exactly the last axis of its rank-`rank`
/// input, keeping dims.
fn is_mean_last(g: &Graph, ix: &Index, n: &Node, rank: usize) -> bool {
    let Op::Reduce {
        op: ReduceOp::Mean,
        keepdims: true,
        ..
    } = n.op
    else {
        return false;
    };
    let Some(axes) = n.input(1).and_then(|a| constant(g, ix, a)) else {
        return false;
    };
    matches!(axes.to_i64_vec().as_deref(), Ok([a]) if *a == -1 || *a == rank as i64 - 1)
}

/// The only reader of `v` if it is a node of kind `want` (by op name).
fn next<'g>(g: &'g Graph, ix: &Index, v: &str, want: &str) -> Option<(usize, &'g Node)> {
    let r = ix.single_reader(v)?;
    let n = &g.nodes[r];
    (n.op.name() == want).then_some((r, n))
}

/// `v * v` or `Pow(v, 2)`.
fn is_square_of(g: &Graph, ix: &Index, n: &Node, v: &str) -> bool {
    (is_binary(n, BinaryOp::Mul) && n.input(0) == Some(v) && n.input(1) == Some(v))
        || (is_binary(n, BinaryOp::Pow)
            && n.input(0) == Some(v)
            && n.input(1).and_then(|e| scalar_const(g, ix, e)) == Some(2.0))
}

/// A constant f32 that varies only along the last axis of a rank-`rank`
/// tensor with last dim `d`, as `[d]` values.
fn last_axis_param(g: &Graph, ix: &Index, name: &str, rank: usize, d: usize) -> Option<Param> {
    let t = constant(g, ix, name)?;
    if t.dtype() != DType::F32 || t.rank() > rank || t.rank() == 0 {
        return None;
    }
    let (last, lead) = t.shape().split_last()?;
    if *last != d || lead.iter().any(|&s| s != 1) {
        return None;
    }
    Some(if t.rank() == 1 {
        Param::Value(name.to_string())
    } else {
        Param::New(
            format!("{name}_1d"),
            t.as_ref().clone().reshaped(vec![d]).ok()?,
        )
    })
}

/// `Add(v, eps) -> Sqrt`, each read only by the next: (eps, add, sqrt).
fn eps_sqrt(g: &Graph, ix: &Index, v: &str) -> Option<(f32, usize, usize)> {
    let (ae, an) = next(g, ix, v, "Add")?;
    if !is_binary(an, BinaryOp::Add) {
        return None;
    }
    let eps = scalar_const(g, ix, other_input(an, v)?)?;
    if !(0.0..1.0).contains(&eps) {
        return None;
    }
    let (sq, _) = next(g, ix, single_output(an)?, "Sqrt")?;
    Some((eps as f32, ae, sq))
}

fn layer_norm_at(g: &Graph, ix: &Index, i: usize) -> Option<Match> {
    let m1 = &g.nodes[i];
    let x = m1.input(0)?;
    let shape = shape_of(g, x)?;
    let rank = shape.len();
    let d = shape.last().and_then(Dim::known)?;
    if dtype_of(g, x) != Some(DType::F32) || !is_mean_last(g, ix, m1, rank) {
        return None;
    }
    let mean = single_output(m1)?;
    let (sub, sn) = next(g, ix, mean, "Sub")?;
    if sn.input(0) != Some(x) || sn.input(1) != Some(mean) {
        return None;
    }
    let dv = single_output(sn)?;
    // d is read by the square and by the final Div, nothing else.
    let readers = ix.readers(dv);
    if ix.is_pinned(dv) || readers.len() != 2 {
        return None;
    }
    let (sqi, divi) = if is_square_of(g, ix, &g.nodes[readers[0]], dv) {
        (readers[0], readers[1])
    } else {
        (readers[1], readers[0])
    };
    if !is_square_of(g, ix, &g.nodes[sqi], dv) {
        return None;
    }
    let (m2, m2n) = next(g, ix, single_output(&g.nodes[sqi])?, "ReduceMean")?;
    if !is_mean_last(g, ix, m2n, rank) {
        return None;
    }
    let (eps, ae, sqrt) = eps_sqrt(g, ix, single_output(m2n)?)?;
    let dn = &g.nodes[divi];
    if !is_binary(dn, BinaryOp::Div)
        || dn.input(0) != Some(dv)
        || dn.input(1) != single_output(&g.nodes[sqrt])
        || ix.single_reader(single_output(&g.nodes[sqrt])?) != Some(divi)
    {
        return None;
    }
    let mut remove = vec![i, sub, sqi, m2, ae, sqrt, divi];
    let mut cur = single_output(dn)?;
    let mut last = divi;
    // Optional gamma, then optional beta.
    let mut gamma = None;
    if let Some((mi, mn)) = next(g, ix, cur, "Mul") {
        if let Some(p) = other_input(mn, cur).and_then(|o| last_axis_param(g, ix, o, rank, d)) {
            gamma = Some(p);
            remove.push(mi);
            last = mi;
            cur = single_output(mn)?;
        }
    }
    let mut beta = None;
    if let Some((ai, an)) = next(g, ix, cur, "Add") {
        if let Some(p) = other_input(an, cur).and_then(|o| last_axis_param(g, ix, o, rank, d)) {
            if gamma.is_none() {
                gamma = Some(Param::New(
                    "ln_ones".into(),
                    f32_tensor(vec![d], vec![1.0; d]),
                ));
            }
            beta = Some(p);
            remove.push(ai);
            last = ai;
            cur = single_output(an)?;
        }
    }
    let gamma =
        gamma.unwrap_or_else(|| Param::New("ln_ones".into(), f32_tensor(vec![d], vec![1.0; d])));
    if !same_shape(g, x, cur) {
        return None;
    }
    remove.retain(|&r| r != last);
    Some(Match {
        op: Op::LayerNormalization {
            axis: -1,
            epsilon: eps,
        },
        x: x.to_string(),
        params: vec![Some(gamma), beta],
        last,
        remove,
    })
}

fn rms_norm_at(g: &Graph, ix: &Index, i: usize) -> Option<Match> {
    // Anchor: the square of x.
    let sqn = &g.nodes[i];
    let x = sqn.input(0)?;
    if !is_square_of(g, ix, sqn, x) {
        return None;
    }
    let shape = shape_of(g, x)?;
    let rank = shape.len();
    let d = shape.last().and_then(Dim::known)?;
    if dtype_of(g, x) != Some(DType::F32) {
        return None;
    }
    let (m, mn) = next(g, ix, single_output(sqn)?, "ReduceMean")?;
    if !is_mean_last(g, ix, mn, rank) {
        return None;
    }
    let (eps, ae, sqrt) = eps_sqrt(g, ix, single_output(mn)?)?;
    let sv = single_output(&g.nodes[sqrt])?;
    let r = ix.single_reader(sv)?;
    let rn = &g.nodes[r];
    let mut remove = vec![i, m, ae, sqrt];
    // x / s, x * (1 / s), x * Reciprocal(s).
    let (normed, last) =
        if is_binary(rn, BinaryOp::Div) && rn.input(0) == Some(x) && rn.input(1) == Some(sv) {
            (single_output(rn)?, r)
        } else {
            let inv_of_s = rn.op == Op::Unary(UnaryOp::Reciprocal)
                || (is_binary(rn, BinaryOp::Div)
                    && rn.input(1) == Some(sv)
                    && rn.input(0).and_then(|o| scalar_const(g, ix, o)) == Some(1.0));
            if !inv_of_s {
                return None;
            }
            let inv = single_output(rn)?;
            let mi = ix.single_reader(inv)?;
            let mn = &g.nodes[mi];
            if !is_binary(mn, BinaryOp::Mul) || other_input(mn, inv) != Some(x) {
                return None;
            }
            remove.push(r);
            (single_output(mn)?, mi)
        };
    let mut last = last;
    let mut out = normed;
    let mut gamma = None;
    if let Some((gi, gn)) = next(g, ix, normed, "Mul") {
        if let Some(p) = other_input(gn, normed).and_then(|o| last_axis_param(g, ix, o, rank, d)) {
            gamma = Some(p);
            remove.push(last);
            last = gi;
            out = single_output(gn)?;
        }
    }
    let gamma =
        gamma.unwrap_or_else(|| Param::New("rms_ones".into(), f32_tensor(vec![d], vec![1.0; d])));
    if !same_shape(g, x, out) {
        return None;
    }
    remove.retain(|&k| k != last);
    Some(Match {
        op: Op::Attn(AttnOp::RmsNormalization {
            axis: -1,
            epsilon: eps,
        }),
        x: x.to_string(),
        params: vec![Some(gamma)],
        last,
        remove,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    fn bin(b: BinaryOp) -> Op {
        Op::Binary(b)
    }

    fn mean() -> Op {
        Op::Reduce {
            op: ReduceOp::Mean,
            keepdims: true,
            noop_with_empty_axes: false,
        }
    }

    /// LayerNorm written out; `square` 0: Pow, 1: Mul. `affine` 0: none,
    /// 1: gamma, 2: gamma + beta. `axis` is the ReduceMean axis.
    fn ln_graph(square: usize, affine: usize, axis: i64, gamma_shape: &[usize]) -> Graph {
        let mut b = Builder::new();
        b.input_dims(
            "x0",
            DType::F32,
            vec![Dim::named("N"), Dim::Known(3), Dim::Known(8)],
        );
        b.node(Op::Unary(UnaryOp::Relu), &["x0"], &["x"]);
        let ax = b.init_i64("ax", vec![axis]);
        let two = b.scalar("two", 2.0);
        let eps = b.scalar("eps", 1e-5);
        let gamma = b.init_rand("gamma", gamma_shape, 0.5, 1.5);
        let beta = b.init_rand("beta", &[8], -0.5, 0.5);
        b.node(mean(), &["x", &ax], &["mu"]);
        b.node(bin(BinaryOp::Sub), &["x", "mu"], &["d"]);
        if square == 0 {
            b.node(bin(BinaryOp::Pow), &["d", &two], &["d2"]);
        } else {
            b.node(bin(BinaryOp::Mul), &["d", "d"], &["d2"]);
        }
        b.node(mean(), &["d2", &ax], &["var"]);
        b.node(bin(BinaryOp::Add), &["var", &eps], &["ve"]);
        b.node(Op::Unary(UnaryOp::Sqrt), &["ve"], &["sd"]);
        b.node(bin(BinaryOp::Div), &["d", "sd"], &["n"]);
        let mut cur = "n";
        if affine >= 1 {
            b.node(bin(BinaryOp::Mul), &[&gamma, "n"], &["ng"]);
            cur = "ng";
        }
        if affine >= 2 {
            b.node(bin(BinaryOp::Add), &["ng", &beta], &["nb"]);
            cur = "nb";
        }
        b.node(Op::Unary(UnaryOp::Relu), &[cur], &["y"]);
        b.output("y", DType::F32);
        b.finish()
    }

    #[test]
    fn recognizes_layer_norm_forms() {
        for square in 0..2 {
            for affine in 0..3 {
                for (axis, gshape) in [(-1, vec![8]), (2, vec![1, 1, 8])] {
                    let g = ln_graph(square, affine, axis, &gshape);
                    let (after, n) = check_pass(&g, run);
                    assert_eq!(n, 1, "square {square} affine {affine} axis {axis}");
                    assert_eq!(after.nodes.len(), 3, "{:#?}", after.nodes);
                    assert_eq!(count_op(&after, "LayerNormalization"), 1);
                }
            }
        }
    }

    #[test]
    fn leaves_layer_norm_over_other_axes_or_with_shared_intermediates() {
        let g = ln_graph(0, 2, 1, &[8]);
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));

        let mut g = ln_graph(0, 2, -1, &[8]);
        g.outputs.push(kiln_ir::ValueInfo {
            name: "var".into(),
            ty: kiln_ir::ValueType::new(DType::F32, None),
        });
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));

        // gamma varying along another axis is not a LayerNorm scale: the
        // normalization is still recognized, the Mul stays.
        let g = ln_graph(0, 1, -1, &[3, 1]);
        let (after, n) = check_pass(&g, run);
        assert_eq!(n, 1);
        assert_eq!(count_op(&after, "LayerNormalization"), 1);
        assert_eq!(count_op(&after, "Mul"), 1);
    }

    fn rms_graph(form: usize, gamma: bool) -> Graph {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 3, 16]);
        let ax = b.init_i64("ax", vec![-1]);
        let two = b.scalar("two", 2.0);
        let eps = b.scalar("eps", 1e-6);
        let one = b.scalar("one", 1.0);
        let w = b.init_rand("w", &[16], 0.5, 1.5);
        b.node(bin(BinaryOp::Pow), &["x", &two], &["x2"]);
        b.node(mean(), &["x2", &ax], &["ms"]);
        b.node(bin(BinaryOp::Add), &[&eps, "ms"], &["mse"]);
        b.node(Op::Unary(UnaryOp::Sqrt), &["mse"], &["rms"]);
        match form {
            0 => b.node(bin(BinaryOp::Div), &["x", "rms"], &["n"]),
            1 => {
                b.node(Op::Unary(UnaryOp::Reciprocal), &["rms"], &["inv"]);
                b.node(bin(BinaryOp::Mul), &["x", "inv"], &["n"]);
            }
            _ => {
                b.node(bin(BinaryOp::Div), &[&one, "rms"], &["inv"]);
                b.node(bin(BinaryOp::Mul), &["inv", "x"], &["n"]);
            }
        }
        if gamma {
            b.node(bin(BinaryOp::Mul), &[&w, "n"], &["y"]);
        } else {
            b.node(Op::Identity, &["n"], &["y"]);
        }
        b.output("y", DType::F32);
        b.finish()
    }

    #[test]
    fn recognizes_rms_norm_forms() {
        for form in 0..3 {
            for gamma in [true, false] {
                let g = rms_graph(form, gamma);
                let (after, n) = check_pass(&g, run);
                assert_eq!(n, 1, "form {form} gamma {gamma}");
                assert_eq!(count_op(&after, "RMSNormalization"), 1);
                assert_eq!(after.nodes.len(), if gamma { 1 } else { 2 });
            }
        }
    }

    #[test]
    fn leaves_rms_norm_with_overridable_eps() {
        let mut g = rms_graph(0, true);
        g.inputs.push(kiln_ir::ValueInfo {
            name: "eps".into(),
            ty: kiln_ir::ValueType::new(DType::F32, Some(vec![])),
        });
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));
    }
}
