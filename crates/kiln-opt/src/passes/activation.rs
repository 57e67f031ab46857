//! Activation recognition: the primitive forms exporters emit become one op.
//!
//! - Gelu, erf form: `x * 0.5 * (1 + Erf(x / 1.4142..))`, with `x * 0.7071..`
//!   for the division and the three factors `x`, `0.5` and `1 + erf` multiplied
//!   in any order or grouping (including `0.5 * x` computed first).
//! - Gelu, tanh form: `x * 0.5 * (1 + Tanh(0.7978.. * (x + 0.044715 * x^3)))`
//!   with `Pow(x, 3)`, `x * x * x` or `x * (x * x)` for the cube.
//! - HardSwish: `x * HardSigmoid(x)` (alpha 1/6, beta 1/2) and
//!   `x * Clip(x + 3, 0, 6) / 6` (division or multiplication by 1/6, in any
//!   order).
//!
//! SiLU (`x * Sigmoid(x)`) has no op of its own; fusion recognizes it directly
//! after a Conv or MatMul. All recognized forms need f32 `x`, the result's shape
//! provably equal to x's, scalar constants, and every intermediate read only
//! inside the pattern.

use crate::util::{
    approx, dtype_of, is_binary, other_input, remove_nodes, rewrite_each, same_shape, scalar_const,
    single_output, single_reader_is, Index,
};
use crate::PassCtx;
use kiln_ir::{BinaryOp, DType, Graph, Op, UnaryOp};

/// Relative tolerance for exporters' rounded constants (1.4142, 0.7071).
const TOL: f64 = 1e-3;

pub fn run(g: &mut Graph, _ctx: &PassCtx) -> usize {
    rewrite_each(g, match_at, |g, m| {
        let node = &mut g.nodes[m.last];
        node.op = Op::Unary(m.op);
        node.inputs = vec![Some(m.x)];
        remove_nodes(g, &m.remove);
    })
}

/// A recognized activation: node `last` becomes `op(x)`; `remove` go.
struct Match {
    op: UnaryOp,
    x: String,
    last: usize,
    remove: Vec<usize>,
}

fn match_at(g: &Graph, ix: &Index, i: usize) -> Option<Match> {
    let m = match &g.nodes[i].op {
        Op::Unary(UnaryOp::Erf) => gelu_erf(g, ix, i),
        Op::Unary(UnaryOp::Tanh) => gelu_tanh(g, ix, i),
        Op::Unary(UnaryOp::HardSigmoid { alpha, beta }) => {
            if !approx(*alpha as f64, 1.0 / 6.0, TOL) || !approx(*beta as f64, 0.5, TOL) {
                return None;
            }
            let x = g.nodes[i].input(0)?.to_string();
            let out = single_output(&g.nodes[i])?;
            let mul = ix.single_reader(out)?;
            let mn = &g.nodes[mul];
            if !is_binary(mn, BinaryOp::Mul) || other_input(mn, out)? != x {
                return None;
            }
            Some(Match {
                op: UnaryOp::HardSwish,
                x,
                last: mul,
                remove: vec![i],
            })
        }
        Op::Clip => hardswish_clip(g, ix, i),
        _ => None,
    }?;
    // The result must be exactly x's shape and f32.
    let out = single_output(&g.nodes[m.last])?;
    (dtype_of(g, &m.x) == Some(DType::F32) && same_shape(g, &m.x, out)).then_some(m)
}

/// The producer of `v` when `reader` is its only reader.
fn feeding(ix: &Index, v: &str, reader: usize) -> Option<usize> {
    single_reader_is(ix, v, reader).then_some(())?;
    ix.producer_of(v)
}

/// `(data, constant)` of a two-input node where one input is a scalar constant.
fn with_const<'a>(g: &'a Graph, ix: &Index, n: usize) -> Option<(&'a str, f64)> {
    let node = &g.nodes[n];
    let (a, b) = (node.input(0)?, node.input(1)?);
    if let Some(c) = scalar_const(g, ix, b) {
        return Some((a, c));
    }
    if node.op == Op::Binary(BinaryOp::Div) {
        return None;
    }
    scalar_const(g, ix, a).map(|c| (b, c))
}

/// From `start` (already known to be one factor), follows up to three Mul (or
/// Div by a constant) nodes; succeeds when the result is `x * start * k` with
/// `k` ≈ `want_k`. Returns the last node and the intermediate nodes passed
/// (including a separately computed `x * c`).
fn product_tail(
    g: &Graph,
    ix: &Index,
    start: &str,
    x: &str,
    want_k: f64,
) -> Option<(usize, Vec<usize>)> {
    let mut cur = start.to_string();
    let mut passed: Vec<usize> = Vec::new();
    let mut have_x = false;
    let mut k = 1.0f64;
    for _ in 0..3 {
        let m = ix.single_reader(&cur)?;
        let n = &g.nodes[m];
        let out = single_output(n)?.to_string();
        if is_binary(n, BinaryOp::Mul) {
            let other = other_input(n, &cur)?;
            if other == cur {
                return None;
            }
            if other == x && !have_x {
                have_x = true;
            } else if let Some(c) = scalar_const(g, ix, other) {
                k *= c;
            } else {
                // `x * c` computed on its own, read only here.
                let p = feeding(ix, other, m)?;
                if !is_binary(&g.nodes[p], BinaryOp::Mul) || have_x {
                    return None;
                }
                let (data, c) = with_const(g, ix, p)?;
                if data != x {
                    return None;
                }
                have_x = true;
                k *= c;
                passed.push(p);
            }
        } else if is_binary(n, BinaryOp::Div) && n.input(0) == Some(cur.as_str()) {
            let c = scalar_const(g, ix, n.input(1)?)?;
            k /= c;
        } else {
            return None;
        }
        if have_x && approx(k, want_k, TOL) {
            return Some((m, passed));
        }
        passed.push(m);
        cur = out;
    }
    None
}

/// `1 + v` where `v` is read only by that Add: returns the Add node.
fn plus_one(g: &Graph, ix: &Index, v: &str) -> Option<usize> {
    let a = ix.single_reader(v)?;
    let n = &g.nodes[a];
    if !is_binary(n, BinaryOp::Add) {
        return None;
    }
    let c = scalar_const(g, ix, other_input(n, v)?)?;
    (c == 1.0).then_some(a)
}

fn gelu_erf(g: &Graph, ix: &Index, e: usize) -> Option<Match> {
    let t = g.nodes[e].input(0)?;
    let p = feeding(ix, t, e)?;
    let pn = &g.nodes[p];
    let x = if is_binary(pn, BinaryOp::Div) {
        let (x, c) = with_const(g, ix, p)?;
        approx(c, std::f64::consts::SQRT_2, TOL).then_some(x)?
    } else if is_binary(pn, BinaryOp::Mul) {
        let (x, c) = with_const(g, ix, p)?;
        approx(c, std::f64::consts::FRAC_1_SQRT_2, TOL).then_some(x)?
    } else {
        return None;
    };
    let add = plus_one(g, ix, single_output(&g.nodes[e])?)?;
    let (last, passed) = product_tail(g, ix, single_output(&g.nodes[add])?, x, 0.5)?;
    let mut remove = vec![p, e, add];
    remove.extend(passed);
    Some(Match {
        op: UnaryOp::Gelu { tanh_approx: false },
        x: x.to_string(),
        last,
        remove,
    })
}

fn gelu_tanh(g: &Graph, ix: &Index, th: usize) -> Option<Match> {
    let u = g.nodes[th].input(0)?;
    let pu = feeding(ix, u, th)?;
    if !is_binary(&g.nodes[pu], BinaryOp::Mul) {
        return None;
    }
    let (s, c) = with_const(g, ix, pu)?;
    if !approx(c, (2.0 / std::f64::consts::PI).sqrt(), TOL) {
        return None;
    }
    let ps = feeding(ix, s, pu)?;
    let sn = &g.nodes[ps];
    if !is_binary(sn, BinaryOp::Add) {
        return None;
    }
    let (p0, p1) = (sn.input(0)?, sn.input(1)?);
    let (x, cube_nodes) = [(p0, p1), (p1, p0)]
        .into_iter()
        .find_map(|(x, k)| cubic_term(g, ix, x, k, ps).map(|nodes| (x, nodes)))?;
    let add = plus_one(g, ix, single_output(&g.nodes[th])?)?;
    let (last, passed) = product_tail(g, ix, single_output(&g.nodes[add])?, x, 0.5)?;
    let mut remove = vec![pu, ps, th, add];
    remove.extend(cube_nodes);
    remove.extend(passed);
    Some(Match {
        op: UnaryOp::Gelu { tanh_approx: true },
        x: x.to_string(),
        last,
        remove,
    })
}

/// Nodes computing `k = 0.044715 * x^3`, read only by node `reader`.
fn cubic_term(g: &Graph, ix: &Index, x: &str, k: &str, reader: usize) -> Option<Vec<usize>> {
    let pk = feeding(ix, k, reader)?;
    if !is_binary(&g.nodes[pk], BinaryOp::Mul) {
        return None;
    }
    let (cube, c) = with_const(g, ix, pk)?;
    if !approx(c, 0.044715, TOL) {
        return None;
    }
    let pc = feeding(ix, cube, pk)?;
    let cn = &g.nodes[pc];
    if is_binary(cn, BinaryOp::Pow) {
        let ok = cn.input(0) == Some(x) && scalar_const(g, ix, cn.input(1)?) == Some(3.0);
        return ok.then(|| vec![pk, pc]);
    }
    if !is_binary(cn, BinaryOp::Mul) {
        return None;
    }
    // x * (x * x) in either order.
    let sq = other_input(cn, x)?;
    let psq = feeding(ix, sq, pc)?;
    let sqn = &g.nodes[psq];
    (is_binary(sqn, BinaryOp::Mul) && sqn.input(0) == Some(x) && sqn.input(1) == Some(x))
        .then(|| vec![pk, pc, psq])
}

/// `x * Clip(x + 3, 0, 6) / 6`.
fn hardswish_clip(g: &Graph, ix: &Index, cl: usize) -> Option<Match> {
    let n = &g.nodes[cl];
    let lo = scalar_const(g, ix, n.input(1)?)?;
    let hi = scalar_const(g, ix, n.input(2)?)?;
    if lo != 0.0 || hi != 6.0 {
        return None;
    }
    let a = n.input(0)?;
    let pa = feeding(ix, a, cl)?;
    if !is_binary(&g.nodes[pa], BinaryOp::Add) {
        return None;
    }
    let (x, three) = with_const(g, ix, pa)?;
    if three != 3.0 {
        return None;
    }
    let (last, passed) = product_tail(g, ix, single_output(n)?, x, 1.0 / 6.0)?;
    let mut remove = vec![pa, cl];
    remove.extend(passed);
    Some(Match {
        op: UnaryOp::HardSwish,
        x: x.to_string(),
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

    /// One graph per ordering exporters produce: y = gelu(x) then Relu (so x
    /// and y are intermediates like in a real model).
    fn gelu_erf_graph(variant: usize) -> Graph {
        let mut b = Builder::new();
        b.input("x0", DType::F32, &[2, 8]);
        b.node(Op::Unary(UnaryOp::Relu), &["x0"], &["x"]);
        let sqrt2 = b.scalar("sqrt2", 1.414_213_5);
        let isqrt2 = b.scalar("isqrt2", 0.707_106_77);
        let one = b.scalar("one", 1.0);
        let half = b.scalar("half", 0.5);
        if variant % 2 == 0 {
            b.node(bin(BinaryOp::Div), &["x", &sqrt2], &["t"]);
        } else {
            b.node(bin(BinaryOp::Mul), &[&isqrt2, "x"], &["t"]);
        }
        b.node(Op::Unary(UnaryOp::Erf), &["t"], &["e"]);
        b.node(bin(BinaryOp::Add), &[&one, "e"], &["a"]);
        match variant / 2 {
            0 => {
                // (x * a) * 0.5  (PyTorch)
                b.node(bin(BinaryOp::Mul), &["x", "a"], &["m"]);
                b.node(bin(BinaryOp::Mul), &["m", &half], &["y"]);
            }
            1 => {
                // (0.5 * x) * a  (TF / Keras)
                b.node(bin(BinaryOp::Mul), &[&half, "x"], &["h"]);
                b.node(bin(BinaryOp::Mul), &["h", "a"], &["y"]);
            }
            _ => {
                // x * (a * 0.5)
                b.node(bin(BinaryOp::Mul), &["a", &half], &["m"]);
                b.node(bin(BinaryOp::Mul), &["m", "x"], &["y"]);
            }
        }
        b.node(Op::Unary(UnaryOp::Relu), &["y"], &["z"]);
        b.output("z", DType::F32);
        b.finish()
    }

    #[test]
    fn recognizes_gelu_erf_in_every_ordering() {
        for v in 0..6 {
            let g = gelu_erf_graph(v);
            let (after, n) = check_pass(&g, run);
            assert_eq!(n, 1, "variant {v}");
            assert_eq!(after.nodes.len(), 3, "variant {v}: {:#?}", after.nodes);
            assert_eq!(count_op(&after, "Gelu"), 1);
        }
    }

    #[test]
    fn leaves_gelu_when_an_intermediate_is_read_elsewhere_or_output() {
        let mut g = gelu_erf_graph(0);
        g.outputs.push(kiln_ir::ValueInfo {
            name: "e".into(),
            ty: kiln_ir::ValueType::new(DType::F32, None),
        });
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));

        let mut b = Builder::new();
        b.input("x", DType::F32, &[4]);
        let sqrt2 = b.scalar("sqrt2", 1.414_213_5);
        let one = b.scalar("one", 1.0);
        let half = b.scalar("half", 0.5);
        b.node(bin(BinaryOp::Div), &["x", &sqrt2], &["t"]);
        b.node(Op::Unary(UnaryOp::Erf), &["t"], &["e"]);
        b.node(bin(BinaryOp::Add), &[&one, "e"], &["a"]);
        b.node(bin(BinaryOp::Mul), &["x", "a"], &["m"]);
        b.node(bin(BinaryOp::Mul), &["m", &half], &["y"]);
        b.node(bin(BinaryOp::Add), &["m", "y"], &["z"]); // m read twice
        b.output("z", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));
    }

    #[test]
    fn leaves_gelu_with_wrong_constant() {
        let mut g = gelu_erf_graph(2);
        g.initializers.insert(
            "half".into(),
            std::sync::Arc::new(kiln_ir::Tensor::scalar(0.6f32)),
        );
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));
    }

    #[test]
    fn recognizes_gelu_tanh_with_pow_and_products() {
        for cube in 0..3 {
            let mut b = Builder::new();
            b.input("x", DType::F32, &[3, 5]);
            let three = b.scalar("three", 3.0);
            let k = b.scalar("k", 0.044715);
            let c = b.scalar("c", 0.797_884_6);
            let one = b.scalar("one", 1.0);
            let half = b.scalar("half", 0.5);
            match cube {
                0 => b.node(bin(BinaryOp::Pow), &["x", &three], &["x3"]),
                1 => {
                    b.node(bin(BinaryOp::Mul), &["x", "x"], &["x2"]);
                    b.node(bin(BinaryOp::Mul), &["x2", "x"], &["x3"]);
                }
                _ => {
                    b.node(bin(BinaryOp::Mul), &["x", "x"], &["x2"]);
                    b.node(bin(BinaryOp::Mul), &["x", "x2"], &["x3"]);
                }
            }
            b.node(bin(BinaryOp::Mul), &[&k, "x3"], &["kx3"]);
            b.node(bin(BinaryOp::Add), &["x", "kx3"], &["s"]);
            b.node(bin(BinaryOp::Mul), &["s", &c], &["u"]);
            b.node(Op::Unary(UnaryOp::Tanh), &["u"], &["th"]);
            b.node(bin(BinaryOp::Add), &["th", &one], &["a"]);
            b.node(bin(BinaryOp::Mul), &[&half, "x"], &["h"]);
            b.node(bin(BinaryOp::Mul), &["h", "a"], &["y"]);
            b.output("y", DType::F32);
            let g = b.finish();
            let (after, n) = check_pass(&g, run);
            assert_eq!(n, 1, "cube form {cube}");
            assert_eq!(after.nodes.len(), 1);
            assert_eq!(
                after.nodes[0].op,
                Op::Unary(UnaryOp::Gelu { tanh_approx: true })
            );
            assert_eq!(after.nodes[0].outputs[0].as_deref(), Some("y"));
        }
    }

    #[test]
    fn recognizes_hardswish_forms() {
        // x * HardSigmoid(x)
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 6]);
        b.node(
            Op::Unary(UnaryOp::HardSigmoid {
                alpha: 1.0 / 6.0,
                beta: 0.5,
            }),
            &["x"],
            &["hs"],
        );
        b.node(bin(BinaryOp::Mul), &["x", "hs"], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, after.nodes.len()), (1, 1));
        assert_eq!(count_op(&after, "HardSwish"), 1);

        // x * Clip(x + 3, 0, 6) / 6 and x * (Clip(..) * 0.16666)
        for div in [true, false] {
            let mut b = Builder::new();
            b.input("x", DType::F32, &[2, 6]);
            let three = b.scalar("three", 3.0);
            let zero = b.scalar("zero", 0.0);
            let six = b.scalar("six", 6.0);
            let sixth = b.scalar("sixth", 1.0 / 6.0);
            b.node(bin(BinaryOp::Add), &["x", &three], &["a"]);
            b.node(Op::Clip, &["a", &zero, &six], &["r6"]);
            if div {
                b.node(bin(BinaryOp::Mul), &["x", "r6"], &["m"]);
                b.node(bin(BinaryOp::Div), &["m", &six], &["y"]);
            } else {
                b.node(bin(BinaryOp::Mul), &["r6", &sixth], &["m"]);
                b.node(bin(BinaryOp::Mul), &["x", "m"], &["y"]);
            }
            b.output("y", DType::F32);
            let g = b.finish();
            let (after, n) = check_pass(&g, run);
            assert_eq!((n, after.nodes.len()), (1, 1), "div {div}");
        }
    }

    #[test]
    fn leaves_hardsigmoid_with_default_alpha() {
        let mut b = Builder::new();
        b.input("x", DType::F32, &[2, 6]);
        b.node(
            Op::Unary(UnaryOp::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            }),
            &["x"],
            &["hs"],
        );
        b.node(bin(BinaryOp::Mul), &["x", "hs"], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));
    }

    #[test]
    fn leaves_gelu_that_would_change_the_shape() {
        // The 0.5 constant has shape [1, 1]: the original result is [1, 4].
        let mut b = Builder::new();
        b.input("x", DType::F32, &[4]);
        let sqrt2 = b.scalar("sqrt2", 1.414_213_5);
        let one = b.scalar("one", 1.0);
        let half = b.init_f32("half", &[1, 1], vec![0.5]);
        b.node(bin(BinaryOp::Div), &["x", &sqrt2], &["t"]);
        b.node(Op::Unary(UnaryOp::Erf), &["t"], &["e"]);
        b.node(bin(BinaryOp::Add), &[&one, "e"], &["a"]);
        b.node(bin(BinaryOp::Mul), &["x", "a"], &["m"]);
        b.node(bin(BinaryOp::Mul), &["m", &half], &["y"]);
        b.output("y", DType::F32);
        let g = b.finish();
        let (after, n) = check_pass(&g, run);
        assert_eq!((n, &after), (0, &g));
    }
}
