//! Static shape and type inference over a whole graph.
//!
//! [`infer_graph`] walks a graph in topological order and gives every value an
//! element type and, where it can be determined, a symbolic shape (known
//! numbers, the model's named dims, and small expressions over them such as
//! `S*12` or `(H-1)/2+1`).
//!
//! Besides types, the pass tracks the *content* of small 0-D/1-D integer values:
//! the output of `Shape(x)` for `x: [N, S, 768]` holds `[N, S, 768]`, and that
//! content flows through `Gather`, `Slice`, `Concat`, `Unsqueeze`, arithmetic and
//! so on. Ops that take a shape as an input (`Reshape`, `Expand`, `Tile`,
//! `ConstantOfShape`, `Slice`, `Resize`, ...) use it, which keeps the symbolic
//! output shapes of BERT/GPT-2 style `Shape -> Gather -> Unsqueeze -> Concat ->
//! Reshape` chains.
//!
//! Error policy: a clash that is certain (input dtypes that must match and do
//! not, known inner dimensions of a MatMul that differ, a Conv channel mismatch
//! on known dims, ...) is an [`IrError::Invalid`] naming the node, the op and the
//! types or shapes involved. Anything not known is never an error: it yields
//! [`Dim::Unknown`] or an unknown rank. No input, however hostile, makes the
//! pass panic: all arithmetic is checked, and sizes taken from the graph are
//! bounded before anything is allocated from them.

use crate::{
    broadcast_shapes, format_shape, known_shape, AutoPad, BinaryOp, ConvAttrs, ConvTransposeAttrs,
    CoordTransform, DType, Dim, DimExpr, Graph, IrError, KeepAspect, LstmAttrs, Node, Op,
    PoolAttrs, ReduceOp, ResizeAttrs, RnnDirection, Shape, Tensor, UnaryOp, ValueKind, ValueType,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// What inference noticed but tolerated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InferReport {
    /// E.g. declared shapes that inference corrected.
    pub warnings: Vec<String>,
}

/// Infers the type of every value, storing results in `graph.value_types` (and
/// in subgraphs), and updates `graph.outputs` with the inferred types.
///
/// `outer` gives the types of values visible from enclosing graphs (empty for
/// the main graph).
pub fn infer_graph(
    graph: &mut Graph,
    outer: &HashMap<String, ValueType>,
) -> Result<InferReport, IrError> {
    infer_graph_with_values(graph, outer, &HashMap::new()).map(|(report, _)| report)
}

/// Like [`infer_graph`], and also returns the symbolic content inference found
/// for small 0-D/1-D integer values (for example `Shape(x)` of `x: [N, S, 768]`
/// holds `[N, S, 768]`). Scalars have one element. Values whose content holds a
/// negative number are left out, as `Dim` cannot express them.
///
/// `outer_values` gives known contents of values of enclosing graphs.
pub fn infer_graph_with_values(
    graph: &mut Graph,
    outer: &HashMap<String, ValueType>,
    outer_values: &HashMap<String, Vec<Dim>>,
) -> Result<(InferReport, HashMap<String, Vec<Dim>>), IrError> {
    let visible: HashSet<String> = outer.keys().chain(outer_values.keys()).cloned().collect();
    let scope = Scope {
        types: outer.clone(),
        values: outer_values
            .iter()
            .filter(|(_, v)| v.len() <= MAX_CONTENT)
            .map(|(k, v)| (k.clone(), v.iter().map(sym_of_dim).collect()))
            .collect(),
        consts: HashMap::new(),
    };
    let mut warnings = Vec::new();
    let scope = infer_in(graph, &visible, scope, &mut warnings, 0)?;
    let values = scope
        .values
        .into_iter()
        .filter_map(|(k, v)| {
            let dims: Option<Vec<Dim>> = v
                .iter()
                .map(|s| match s {
                    Sym::Int(x) => usize::try_from(*x).ok().map(Dim::Known),
                    Sym::Dim(d) => Some(d.clone()),
                })
                .collect();
            dims.map(|d| (k, d))
        })
        .collect();
    Ok((InferReport { warnings }, values))
}

/// Largest number of elements whose content is tracked.
const MAX_CONTENT: usize = 64;
/// Largest rank built from a size read off the graph (a shape input's length).
const MAX_RANK: usize = 256;
/// Bounds on symbolic expressions: terms of a polynomial, factors of a term,
/// nodes of a `Dim` tree. Past them a dim becomes `Unknown`.
const MAX_TERMS: usize = 16;
const MAX_DEGREE: usize = 8;
const MAX_DIM_NODES: usize = 64;
/// Deepest nesting of subgraphs inferred.
const MAX_DEPTH: usize = 64;
/// From this subgraph depth on, Loop bodies are inferred once with the shapes
/// of loop-carried values left open (keeps nested loops linear).
const LOOP_FIXPOINT_DEPTH: usize = 3;
/// Slice ends at or past this mean "to the end" on symbolic dims.
const BIG_END: i64 = i32::MAX as i64;

// ---------------------------------------------------------------------------
// Symbolic arithmetic: dims as polynomials with integer coefficients over
// atoms (named dims and floor divisions that do not simplify).
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Default, PartialEq)]
struct Poly {
    /// Sorted atom keys of a monomial -> coefficient (never zero).
    terms: BTreeMap<Vec<String>, i128>,
    atoms: BTreeMap<String, Dim>,
}

impl Poly {
    fn constant(c: i128) -> Poly {
        let mut p = Poly::default();
        if c != 0 {
            p.terms.insert(Vec::new(), c);
        }
        p
    }

    fn atom(key: String, d: Dim) -> Poly {
        let mut p = Poly::default();
        p.terms.insert(vec![key.clone()], 1);
        p.atoms.insert(key, d);
        p
    }

    fn as_const(&self) -> Option<i128> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&Vec::new()).copied(),
            _ => None,
        }
    }

    fn bounded(self) -> Option<Poly> {
        (self.terms.len() <= MAX_TERMS).then_some(self)
    }

    fn add(&self, o: &Poly, sign: i128) -> Option<Poly> {
        let mut r = self.clone();
        for (k, &c) in &o.terms {
            let c = c.checked_mul(sign)?;
            let e = r.terms.entry(k.clone()).or_insert(0);
            *e = e.checked_add(c)?;
            if *e == 0 {
                r.terms.remove(k);
            }
        }
        r.atoms
            .extend(o.atoms.iter().map(|(k, v)| (k.clone(), v.clone())));
        r.bounded()
    }

    fn mul(&self, o: &Poly) -> Option<Poly> {
        let mut r = Poly {
            terms: BTreeMap::new(),
            atoms: self.atoms.clone(),
        };
        r.atoms
            .extend(o.atoms.iter().map(|(k, v)| (k.clone(), v.clone())));
        for (ka, &ca) in &self.terms {
            for (kb, &cb) in &o.terms {
                let mut key: Vec<String> = ka.iter().chain(kb.iter()).cloned().collect();
                if key.len() > MAX_DEGREE {
                    return None;
                }
                key.sort();
                let c = ca.checked_mul(cb)?;
                let e = r.terms.entry(key.clone()).or_insert(0);
                *e = e.checked_add(c)?;
                if *e == 0 {
                    r.terms.remove(&key);
                }
            }
            if r.terms.len() > MAX_TERMS {
                return None;
            }
        }
        r.bounded()
    }

    /// `self / d` when the division is exact as polynomials.
    fn div_exact(&self, d: &Poly) -> Option<Poly> {
        if d.terms.is_empty() {
            return None;
        }
        if self.terms.is_empty() {
            return Some(Poly::default());
        }
        let mut r = Poly {
            terms: BTreeMap::new(),
            atoms: self.atoms.clone(),
        };
        if d.terms.len() == 1 {
            let (m, &c) = d.terms.iter().next()?;
            for (t, &k) in &self.terms {
                let rest = remove_factors(t, m)?;
                if k.checked_rem(c)? != 0 {
                    return None;
                }
                r.terms.insert(rest, k.checked_div(c)?);
            }
            return Some(r);
        }
        // Several terms: only a constant multiple of the divisor divides.
        if self.terms.len() != d.terms.len() {
            return None;
        }
        let mut ratio = None;
        for ((ka, &ca), (kb, &cb)) in self.terms.iter().zip(d.terms.iter()) {
            if ka != kb || ca.checked_rem(cb)? != 0 {
                return None;
            }
            let q = ca.checked_div(cb)?;
            if *ratio.get_or_insert(q) != q {
                return None;
            }
        }
        ratio.map(Poly::constant)
    }
}

/// The multiset difference `t - m` of sorted factor lists, if `m` is contained.
fn remove_factors(t: &[String], m: &[String]) -> Option<Vec<String>> {
    let mut rest = t.to_vec();
    for f in m {
        let i = rest.iter().position(|x| x == f)?;
        rest.remove(i);
    }
    Some(rest)
}

/// Node count of a dim tree (stops counting past the bound).
fn dim_nodes(d: &Dim) -> usize {
    let mut n = 0;
    let mut stack = vec![d];
    while let Some(x) = stack.pop() {
        n += 1;
        if n > MAX_DIM_NODES {
            return n;
        }
        if let Dim::Expr(e) = x {
            match &**e {
                DimExpr::Add(a, b)
                | DimExpr::Sub(a, b)
                | DimExpr::Mul(a, b)
                | DimExpr::Div(a, b) => {
                    stack.push(a);
                    stack.push(b);
                }
            }
        }
    }
    n
}

fn poly_of(d: &Dim) -> Option<Poly> {
    if dim_nodes(d) > MAX_DIM_NODES {
        return None;
    }
    to_poly(d)
}

fn to_poly(d: &Dim) -> Option<Poly> {
    match d {
        Dim::Known(v) => Some(Poly::constant(*v as i128)),
        Dim::Named(n) => Some(Poly::atom(format!("a:{n}"), d.clone())),
        Dim::Unknown => None,
        Dim::Expr(e) => match &**e {
            DimExpr::Add(a, b) => to_poly(a)?.add(&to_poly(b)?, 1),
            DimExpr::Sub(a, b) => to_poly(a)?.add(&to_poly(b)?, -1),
            DimExpr::Mul(a, b) => to_poly(a)?.mul(&to_poly(b)?),
            DimExpr::Div(a, b) => poly_div(&to_poly(a)?, &to_poly(b)?),
        },
    }
}

/// Floor division of non-negative quantities.
fn poly_div(a: &Poly, b: &Poly) -> Option<Poly> {
    if let (Some(x), Some(y)) = (a.as_const(), b.as_const()) {
        if y <= 0 || x < 0 {
            return None;
        }
        return Some(Poly::constant(x / y));
    }
    if b.as_const() == Some(0) {
        return None;
    }
    if let Some(q) = a.div_exact(b) {
        return Some(q);
    }
    let d = Dim::Expr(Box::new(DimExpr::Div(from_poly(a)?, from_poly(b)?)));
    if dim_nodes(&d) > MAX_DIM_NODES {
        return None;
    }
    Some(Poly::atom(format!("b:{d:?}"), d))
}

/// Canonical dim of a polynomial: terms by falling degree, then by atom name,
/// the constant last; negative terms subtracted at the end.
fn from_poly(p: &Poly) -> Option<Dim> {
    let mut terms: Vec<(&Vec<String>, i128)> = p
        .terms
        .iter()
        .filter(|(_, c)| **c != 0)
        .map(|(k, c)| (k, *c))
        .collect();
    terms.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(b.0)));
    let mut pos: Option<Dim> = None;
    let mut neg: Option<Dim> = None;
    for (key, c) in terms {
        let mag = usize::try_from(c.unsigned_abs()).ok()?;
        let mut t: Option<Dim> = None;
        for k in key {
            let a = p.atoms.get(k)?.clone();
            t = Some(match t {
                None => a,
                Some(x) => Dim::Expr(Box::new(DimExpr::Mul(x, a))),
            });
        }
        let t = match t {
            None => Dim::Known(mag),
            Some(x) if mag == 1 => x,
            Some(x) => Dim::Expr(Box::new(DimExpr::Mul(x, Dim::Known(mag)))),
        };
        let slot = if c > 0 { &mut pos } else { &mut neg };
        *slot = Some(match slot.take() {
            None => t,
            Some(s) => Dim::Expr(Box::new(DimExpr::Add(s, t))),
        });
    }
    let d = match (pos, neg) {
        (None, None) => Dim::Known(0),
        (Some(p), None) => p,
        (Some(p), Some(n)) => Dim::Expr(Box::new(DimExpr::Sub(p, n))),
        (None, Some(_)) => return None,
    };
    (dim_nodes(&d) <= MAX_DIM_NODES).then_some(d)
}

/// The canonical form of a dim (so that equal expressions compare equal).
fn canon(d: &Dim) -> Dim {
    match d {
        Dim::Expr(_) => poly_of(d)
            .and_then(|p| from_poly(&p))
            .unwrap_or_else(|| d.clone()),
        _ => d.clone(),
    }
}

fn same_dim(a: &Dim, b: &Dim) -> bool {
    !a.is_unknown() && (a == b || canon(a) == canon(b))
}

/// One element of a tracked integer value: a number (possibly negative) or a
/// symbolic, non-negative dim. `Known` dims are always stored as `Int`.
#[derive(Clone, Debug, PartialEq)]
enum Sym {
    Int(i64),
    Dim(Dim),
}

fn sym_of_dim(d: &Dim) -> Sym {
    match d {
        Dim::Known(v) => i64::try_from(*v)
            .map(Sym::Int)
            .unwrap_or(Sym::Dim(Dim::Unknown)),
        other => Sym::Dim(other.clone()),
    }
}

/// The dim an element stands for; negative numbers give `Unknown`.
fn dim_of_sym(s: &Sym) -> Dim {
    match s {
        Sym::Int(v) => usize::try_from(*v).map(Dim::Known).unwrap_or(Dim::Unknown),
        Sym::Dim(d) => d.clone(),
    }
}

fn sym_poly(s: &Sym) -> Option<Poly> {
    match s {
        Sym::Int(v) => Some(Poly::constant(*v as i128)),
        Sym::Dim(d) => poly_of(d),
    }
}

fn sym_of_poly(p: &Poly) -> Sym {
    match p.as_const() {
        Some(c) => i64::try_from(c)
            .map(Sym::Int)
            .unwrap_or(Sym::Dim(Dim::Unknown)),
        None => Sym::Dim(from_poly(p).unwrap_or(Dim::Unknown)),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arith {
    Add,
    Sub,
    Mul,
    /// Floor division.
    Div,
}

fn floor_div(x: i64, y: i64) -> Option<i64> {
    let q = x.checked_div(y)?;
    if x % y != 0 && ((x < 0) != (y < 0)) {
        q.checked_sub(1)
    } else {
        Some(q)
    }
}

fn sym_arith(a: &Sym, b: &Sym, op: Arith) -> Sym {
    if let (Sym::Int(x), Sym::Int(y)) = (a, b) {
        let r = match op {
            Arith::Add => x.checked_add(*y),
            Arith::Sub => x.checked_sub(*y),
            Arith::Mul => x.checked_mul(*y),
            Arith::Div => floor_div(*x, *y),
        };
        return r.map(Sym::Int).unwrap_or(Sym::Dim(Dim::Unknown));
    }
    let (Some(pa), Some(pb)) = (sym_poly(a), sym_poly(b)) else {
        return Sym::Dim(Dim::Unknown);
    };
    let r = match op {
        Arith::Add => pa.add(&pb, 1),
        Arith::Sub => pa.add(&pb, -1),
        Arith::Mul => pa.mul(&pb),
        Arith::Div => {
            if matches!(a, Sym::Int(x) if *x < 0) || matches!(b, Sym::Int(y) if *y <= 0) {
                None
            } else {
                poly_div(&pa, &pb)
            }
        }
    };
    r.map(|p| sym_of_poly(&p)).unwrap_or(Sym::Dim(Dim::Unknown))
}

/// Exact division only (for float-typed content, where Div is not floor).
fn sym_div_exact(a: &Sym, b: &Sym) -> Option<Sym> {
    if let (Sym::Int(x), Sym::Int(y)) = (a, b) {
        return (*y != 0 && x.checked_rem(*y) == Some(0)).then(|| Sym::Int(x / y));
    }
    let q = sym_poly(a)?.div_exact(&sym_poly(b)?)?;
    Some(sym_of_poly(&q))
}

fn darith(a: &Dim, b: &Dim, op: Arith) -> Dim {
    dim_of_sym(&sym_arith(&sym_of_dim(a), &sym_of_dim(b), op))
}

fn dadd_i(a: &Dim, c: i64) -> Dim {
    dim_of_sym(&sym_arith(&sym_of_dim(a), &Sym::Int(c), Arith::Add))
}

fn dprod(ds: &[Dim]) -> Dim {
    let mut acc = Dim::Known(1);
    for d in ds {
        if d.known() == Some(0) {
            return Dim::Known(0);
        }
        acc = darith(&acc, d, Arith::Mul);
    }
    acc
}

fn known_numel(ds: &[Dim]) -> Option<usize> {
    ds.iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(d.known()?))
}

fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i128;
    let a = axis as i128;
    let a = if a < 0 { a + r } else { a };
    (a >= 0 && a < r).then_some(a as usize)
}

/// Normalized axes, or `None` when one is out of range or repeated.
fn norm_axes(axes: &[i64], rank: usize) -> Option<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let a = norm_axis(a, rank)?;
        if out.contains(&a) {
            return None;
        }
        out.push(a);
    }
    Some(out)
}

fn unknown_dims(rank: usize) -> Option<Shape> {
    (rank <= MAX_RANK).then(|| vec![Dim::Unknown; rank])
}

/// Content of a small constant tensor: integers and bools, and floats that hold
/// whole numbers.
fn const_content(t: &Tensor) -> Option<Vec<Sym>> {
    if t.rank() > 1 || t.len() > MAX_CONTENT {
        return None;
    }
    let dt = t.dtype();
    if dt.is_int() || dt == DType::Bool {
        return t
            .to_i64_vec()
            .ok()
            .map(|v| v.into_iter().map(Sym::Int).collect());
    }
    if dt.is_float() {
        let f = t.to_f64_vec().ok()?;
        return f
            .iter()
            .map(|x| {
                (x.is_finite() && x.fract() == 0.0 && x.abs() < 9.0e18)
                    .then_some(Sym::Int(*x as i64))
            })
            .collect();
    }
    None
}

/// Whether content of `len` elements fits a value of type `ty` (0-D or 1-D).
fn content_fits(ty: &ValueType, len: usize) -> bool {
    if len > MAX_CONTENT {
        return false;
    }
    match ty.shape.as_deref() {
        Some([]) => len == 1,
        Some([d]) => !matches!(d.known(), Some(k) if k != len),
        _ => false,
    }
}

/// Declared types the frontend writes for untyped outputs and subgraph inputs.
fn is_placeholder(t: &ValueType) -> bool {
    t.dtype == DType::F32 && t.shape.is_none() && t.is_tensor()
}

/// The kind of a value that is either of kind `a` or `b`: the same kind, or an
/// optional when one side is the optional of the other (a loop-carried value
/// entering as `optional(seq)` and leaving as `seq`).
fn join_kinds(a: &ValueKind, b: &ValueKind) -> Option<ValueKind> {
    match (a, b) {
        _ if a == b => Some(a.clone()),
        (ValueKind::Optional(x), y) | (y, ValueKind::Optional(x)) if **x == *y => {
            Some(ValueKind::Optional(x.clone()))
        }
        _ => None,
    }
}

/// Dims that agree stay, others become unknown; differing ranks give no rank.
fn join_shapes(a: &Option<Shape>, b: &Option<Shape>) -> Option<Shape> {
    match (a, b) {
        (Some(x), Some(y)) if x.len() == y.len() => Some(
            x.iter()
                .zip(y)
                .map(|(p, q)| {
                    if same_dim(p, q) {
                        p.clone()
                    } else {
                        Dim::Unknown
                    }
                })
                .collect(),
        ),
        _ => None,
    }
}

/// The type of a value that is either `a` or `b` (If branches, loop-carried
/// values); `None` when the dtypes clash. A placeholder declaration gives way.
fn join_types(a: &ValueType, b: &ValueType) -> Option<ValueType> {
    let with_kind = |t: ValueType, kind: &ValueKind| ValueType {
        kind: kind.clone(),
        ..t
    };
    if is_placeholder(a) && !is_placeholder(b) {
        Some(with_kind(vt(b.dtype, None), &b.kind))
    } else if is_placeholder(b) && !is_placeholder(a) {
        Some(with_kind(vt(a.dtype, None), &a.kind))
    } else if a.dtype == b.dtype {
        let kind = join_kinds(&a.kind, &b.kind)?;
        Some(with_kind(
            vt(a.dtype, join_shapes(&a.shape, &b.shape)),
            &kind,
        ))
    } else {
        None
    }
}

/// The same dim seen from two inputs that must agree (Concat's other axes).
fn merge_same(a: &Dim, b: &Dim) -> Option<Dim> {
    Some(match (a, b) {
        (Dim::Known(x), Dim::Known(y)) if x != y => return None,
        (Dim::Known(_), _) => a.clone(),
        (_, Dim::Known(_)) => b.clone(),
        (Dim::Unknown, _) => b.clone(),
        _ => a.clone(),
    })
}

fn vt(dtype: DType, shape: Option<Shape>) -> ValueType {
    ValueType::new(dtype, shape)
}

fn typed(dt: Option<DType>, shape: Option<Shape>) -> Option<ValueType> {
    dt.map(|d| ValueType::new(d, shape))
}

fn fmt_opt(s: Option<&[Dim]>) -> String {
    s.map(format_shape)
        .unwrap_or_else(|| "[unknown rank]".to_string())
}

fn nerr(n: &Node, msg: impl std::fmt::Display) -> IrError {
    IrError::Invalid(format!("node '{}' ({}): {msg}", n.name, n.op.name()))
}

fn lerr(label: &str, msg: impl std::fmt::Display) -> IrError {
    IrError::Invalid(format!("{label}: {msg}"))
}

// ---------------------------------------------------------------------------
// Output dims of windowed ops.
// ---------------------------------------------------------------------------

/// `attr[i]` of a per-spatial-axis attribute (empty means `default`).
fn attr_at(v: &[usize], spatial: usize, i: usize, default: usize) -> Option<usize> {
    if v.is_empty() {
        Some(default)
    } else if v.len() == spatial {
        v.get(i).copied()
    } else {
        None
    }
}

fn pads_at(v: &[usize], spatial: usize, i: usize) -> Option<(usize, usize)> {
    if v.is_empty() {
        Some((0, 0))
    } else if v.len() == spatial.checked_mul(2)? {
        Some((*v.get(i)?, *v.get(i + spatial)?))
    } else {
        None
    }
}

/// `ceil(d / s)`.
fn ceil_div_dim(d: &Dim, s: usize) -> Dim {
    let Ok(si) = i64::try_from(s) else {
        return Dim::Unknown;
    };
    if si == 0 {
        return Dim::Unknown;
    }
    darith(&dadd_i(d, si - 1), &Dim::Known(s), Arith::Div)
}

/// One spatial output dim of Conv or a pool. `Err` holds a message when the
/// window certainly does not fit.
#[allow(clippy::too_many_arguments)]
fn window_out_dim(
    input: &Dim,
    kernel: Option<usize>,
    stride: Option<usize>,
    dilation: Option<usize>,
    pads: Option<(usize, usize)>,
    auto_pad: AutoPad,
    ceil_mode: bool,
) -> Result<Dim, String> {
    let s = match stride {
        Some(s) if s > 0 => s,
        _ => return Ok(Dim::Unknown),
    };
    if matches!(auto_pad, AutoPad::SameUpper | AutoPad::SameLower) {
        return Ok(ceil_div_dim(input, s));
    }
    let (Some(k), Some(dil)) = (kernel, dilation) else {
        return Ok(Dim::Unknown);
    };
    if k == 0 || dil == 0 {
        return Ok(Dim::Unknown);
    }
    let Some(eff) = (k as i128 - 1)
        .checked_mul(dil as i128)
        .and_then(|x| x.checked_add(1))
    else {
        return Ok(Dim::Unknown);
    };
    let (pb, pe) = if auto_pad == AutoPad::Valid {
        (0, 0)
    } else {
        match pads {
            Some((b, e)) => (b as i128, e as i128),
            None => return Ok(Dim::Unknown),
        }
    };
    let off = pb + pe - eff;
    let s128 = s as i128;
    if let Some(x) = input.known() {
        let x = x as i128;
        let l = x + off;
        if l < 0 {
            return Err(format!(
                "the window (extent {eff}) is larger than the padded input ({})",
                x + pb + pe
            ));
        }
        let mut o = if ceil_mode {
            (l + s128 - 1) / s128 + 1
        } else {
            l / s128 + 1
        };
        if ceil_mode && (o - 1) * s128 >= x + pb {
            o -= 1;
        }
        return Ok(usize::try_from(o).map(Dim::Known).unwrap_or(Dim::Unknown));
    }
    // Symbolic: with ceil_mode the last window is dropped when it would start in
    // the end padding; that cannot happen when pe + s - 1 < eff.
    if ceil_mode && s > 1 && pe + s128 > eff {
        return Ok(Dim::Unknown);
    }
    let Ok(off) = i64::try_from(off) else {
        return Ok(Dim::Unknown);
    };
    let l = dadd_i(input, off);
    let num = if ceil_mode {
        dadd_i(&l, (s - 1) as i64)
    } else {
        l
    };
    Ok(dadd_i(&darith(&num, &Dim::Known(s), Arith::Div), 1))
}

// ---------------------------------------------------------------------------
// The pass.
// ---------------------------------------------------------------------------

/// What is known about the values visible at one point.
#[derive(Clone, Default)]
struct Scope {
    types: HashMap<String, ValueType>,
    /// Content of small integer values.
    values: HashMap<String, Vec<Sym>>,
    /// Constant tensors (initializers), for float parameters such as scales.
    consts: HashMap<String, Arc<Tensor>>,
}

#[derive(Default)]
struct NodeOut {
    types: Vec<Option<ValueType>>,
    content: Vec<Option<Vec<Sym>>>,
}

impl NodeOut {
    fn one(ty: Option<ValueType>, content: Option<Vec<Sym>>) -> NodeOut {
        NodeOut {
            types: vec![ty],
            content: vec![content],
        }
    }

    fn many(types: Vec<Option<ValueType>>) -> NodeOut {
        NodeOut {
            types,
            content: Vec::new(),
        }
    }
}

struct Ctx<'w> {
    scope: Scope,
    warnings: &'w mut Vec<String>,
    depth: usize,
    /// Names visible to subgraphs of the graph being inferred.
    visible: HashSet<String>,
}

fn infer_in(
    graph: &mut Graph,
    outer_names: &HashSet<String>,
    mut scope: Scope,
    warnings: &mut Vec<String>,
    depth: usize,
) -> Result<Scope, IrError> {
    if depth > MAX_DEPTH {
        return Err(IrError::Invalid(format!(
            "subgraphs are nested more than {MAX_DEPTH} deep"
        )));
    }
    let order = graph.topo_order(outer_names)?;

    // Local definitions shadow those of enclosing graphs.
    for (name, t) in &graph.initializers {
        scope.types.insert(
            name.clone(),
            ValueType::new(t.dtype(), Some(known_shape(t.shape()))),
        );
        scope.consts.insert(name.clone(), t.clone());
        match const_content(t) {
            Some(c) => scope.values.insert(name.clone(), c),
            None => scope.values.remove(name),
        };
    }
    for vi in &graph.inputs {
        if depth > 0 && is_placeholder(&vi.ty) {
            // An untyped subgraph input: its dtype is not known.
            scope.types.remove(&vi.name);
        } else {
            scope.types.insert(vi.name.clone(), vi.ty.clone());
        }
        let keep = graph.initializers.contains_key(&vi.name)
            && scope
                .values
                .get(&vi.name)
                .is_some_and(|c| content_fits(&vi.ty, c.len()));
        if !keep {
            scope.values.remove(&vi.name);
        }
        if !graph.initializers.contains_key(&vi.name) {
            scope.consts.remove(&vi.name);
        }
    }

    let mut visible = outer_names.clone();
    visible.extend(graph.initializers.keys().cloned());
    visible.extend(graph.inputs.iter().map(|v| v.name.clone()));
    for n in &graph.nodes {
        visible.extend(n.present_outputs().map(str::to_string));
    }

    let declared_vt = graph.value_types.clone();
    let declared_out: HashMap<String, ValueType> = graph
        .outputs
        .iter()
        .map(|o| (o.name.clone(), o.ty.clone()))
        .collect();
    let mut ctx = Ctx {
        scope,
        warnings,
        depth,
        visible,
    };
    let mut produced: HashSet<String> = HashSet::new();
    let mut new_types: Vec<(String, ValueType)> = Vec::new();

    for idx in order {
        let Some(node) = graph.nodes.get_mut(idx) else {
            continue;
        };
        let mut res = ctx.node(node)?;
        for (k, out) in node.outputs.iter().enumerate() {
            let Some(name) = out else {
                continue;
            };
            produced.insert(name.clone());
            let mut ty = res.types.get_mut(k).and_then(Option::take);
            if let Some(d) = declared_vt.get(name) {
                ty = reconcile(ctx.warnings, "value", name, ty, d).map_err(|m| nerr(node, m))?;
            }
            if let Some(d) = declared_out.get(name) {
                ty = reconcile(ctx.warnings, "output", name, ty, d).map_err(|m| nerr(node, m))?;
            }
            ctx.scope.consts.remove(name);
            let content = res.content.get_mut(k).and_then(Option::take);
            match ty {
                Some(t) => {
                    match content {
                        Some(c) if content_fits(&t, c.len()) => {
                            ctx.scope.values.insert(name.clone(), c);
                        }
                        _ => {
                            ctx.scope.values.remove(name);
                        }
                    }
                    new_types.push((name.clone(), t.clone()));
                    ctx.scope.types.insert(name.clone(), t);
                }
                None => {
                    ctx.scope.types.remove(name);
                    ctx.scope.values.remove(name);
                }
            }
        }
    }

    for o in graph.outputs.iter_mut() {
        let Some(t) = ctx.scope.types.get(&o.name).cloned() else {
            continue;
        };
        if produced.contains(&o.name) {
            o.ty = t;
        } else if let Some(m) =
            reconcile(ctx.warnings, "output", &o.name, Some(t), &o.ty).map_err(IrError::Invalid)?
        {
            o.ty = m;
        }
    }
    graph.value_types.extend(new_types);
    Ok(ctx.scope)
}

/// Merges an inferred type with a declared one: dims from inference win (with a
/// warning when a declared known dim disagrees), declared dims fill what
/// inference left unknown, and a dtype clash is an error.
fn reconcile(
    warnings: &mut Vec<String>,
    what: &str,
    name: &str,
    inferred: Option<ValueType>,
    declared: &ValueType,
) -> Result<Option<ValueType>, String> {
    let Some(inf) = inferred else {
        // A placeholder says nothing, not even the dtype.
        return Ok((!is_placeholder(declared)).then(|| declared.clone()));
    };
    let kind = if inf.kind == declared.kind || is_placeholder(declared) {
        inf.kind.clone()
    } else if join_kinds(&inf.kind, &declared.kind).is_some() {
        // `optional(T)` against `T`: the declaration says which.
        declared.kind.clone()
    } else {
        return Err(format!(
            "{what} '{name}' is declared {} but inference gives {}",
            declared.describe(),
            inf.describe()
        ));
    };
    if inf.dtype != declared.dtype {
        if is_placeholder(declared) {
            return Ok(Some(inf));
        }
        return Err(format!(
            "{what} '{name}' is declared {} but inference gives {}",
            declared.dtype, inf.dtype
        ));
    }
    let shape = match (&inf.shape, &declared.shape) {
        (None, d) => d.clone(),
        (Some(i), None) => Some(i.clone()),
        (Some(i), Some(d)) => {
            let mut conflict = i.len() != d.len();
            let merged = if conflict {
                i.clone()
            } else {
                i.iter()
                    .zip(d)
                    .map(|(a, b)| match (a, b) {
                        (Dim::Unknown, b) => b.clone(),
                        (a, Dim::Unknown) => a.clone(),
                        (a, b) if same_dim(a, b) => a.clone(),
                        (a, Dim::Known(_)) => {
                            conflict = true;
                            a.clone()
                        }
                        (a, _) => a.clone(),
                    })
                    .collect()
            };
            if conflict {
                warnings.push(format!(
                    "{what} '{name}' is declared {} but inference gives {}; using the inferred shape",
                    format_shape(d),
                    format_shape(i)
                ));
            }
            Some(merged)
        }
    };
    Ok(Some(ValueType {
        kind,
        ..ValueType::new(inf.dtype, shape)
    }))
}

impl Ctx<'_> {
    fn ty(&self, n: &Node, i: usize) -> Option<&ValueType> {
        n.input(i).and_then(|name| self.scope.types.get(name))
    }

    fn dt(&self, n: &Node, i: usize) -> Option<DType> {
        self.ty(n, i).map(|t| t.dtype)
    }

    fn sh(&self, n: &Node, i: usize) -> Option<&[Dim]> {
        self.ty(n, i).and_then(|t| t.shape.as_deref())
    }

    fn content(&self, n: &Node, i: usize) -> Option<&[Sym]> {
        n.input(i)
            .and_then(|name| self.scope.values.get(name))
            .map(|v| v.as_slice())
    }

    fn ints(&self, n: &Node, i: usize) -> Option<Vec<i64>> {
        self.content(n, i)?
            .iter()
            .map(|s| match s {
                Sym::Int(v) => Some(*v),
                Sym::Dim(_) => None,
            })
            .collect()
    }

    /// A 0-D or one-element value's content.
    fn scalar(&self, n: &Node, i: usize) -> Option<Sym> {
        match self.content(n, i)? {
            [s] => Some(s.clone()),
            _ => None,
        }
    }

    /// Elements of a small constant tensor as f64.
    fn floats(&self, n: &Node, i: usize) -> Option<Vec<f64>> {
        let t = self.scope.consts.get(n.input(i)?)?;
        if t.len() > 4 * MAX_CONTENT {
            return None;
        }
        t.to_f64_vec().ok()
    }

    fn present(&self, n: &Node, i: usize) -> bool {
        n.input(i).is_some()
    }

    /// Errors when inputs `a` and `b` both have known, different dtypes.
    fn check_same(&self, n: &Node, a: usize, b: usize) -> Result<(), IrError> {
        if let (Some(da), Some(db)) = (self.dt(n, a), self.dt(n, b)) {
            if da != db {
                return Err(nerr(n, format!("input {b} is {db} but input {a} is {da}")));
            }
        }
        Ok(())
    }

    /// Multidirectional broadcast of the present inputs `idx`; `None` when a rank
    /// is unknown, an error when known dims clash.
    fn broadcast(&self, n: &Node, idx: &[usize]) -> Result<Option<Shape>, IrError> {
        let mut acc: Option<Shape> = Some(Vec::new());
        let mut all_known = true;
        let mut merged: Vec<usize> = Vec::new();
        for &i in idx {
            if !self.present(n, i) {
                continue;
            }
            match self.sh(n, i) {
                None => all_known = false,
                Some(s) => {
                    let prev = acc.take().unwrap_or_default();
                    match broadcast_shapes(&prev, s) {
                        Some(b) => acc = Some(b),
                        None => {
                            return Err(nerr(
                                n,
                                format!(
                                    "input {i} is {}, which does not broadcast with {}{}",
                                    format_shape(s),
                                    format_shape(&prev),
                                    match merged.as_slice() {
                                        [f] => format!(" (input {f})"),
                                        m => format!(" (inputs {m:?} broadcast together)"),
                                    }
                                ),
                            ));
                        }
                    }
                    merged.push(i);
                }
            }
        }
        Ok(if all_known { acc } else { None })
    }

    fn node(&mut self, n: &mut Node) -> Result<NodeOut, IrError> {
        if matches!(n.op, Op::If { .. } | Op::Loop { .. }) {
            return self.control_flow(n);
        }
        self.simple(n)
    }

    /// Inference for the op families that keep their rule beside their enum.
    fn family(
        &self,
        n: &Node,
        rule: impl FnOnce(
            &[Option<ValueType>],
            &[Option<&Tensor>],
            usize,
        ) -> Result<Vec<Option<ValueType>>, String>,
    ) -> Result<NodeOut, IrError> {
        let types: Vec<Option<ValueType>> = (0..n.inputs.len())
            .map(|i| self.ty(n, i).cloned())
            .collect();
        let consts: Vec<Option<&Tensor>> = n
            .inputs
            .iter()
            .map(|o| {
                o.as_deref()
                    .and_then(|name| self.scope.consts.get(name))
                    .map(|t| &**t)
            })
            .collect();
        let out = rule(&types, &consts, n.outputs.len()).map_err(|m| nerr(n, m))?;
        Ok(NodeOut::many(out))
    }

    fn simple(&self, n: &Node) -> Result<NodeOut, IrError> {
        let t0 = self.ty(n, 0);
        let dt0 = t0.map(|t| t.dtype);
        let s0: Option<Shape> = t0.and_then(|t| t.shape.clone());
        let c0 = || self.content(n, 0).map(|c| c.to_vec());
        Ok(match &n.op {
            Op::Unary(u) => {
                let dt = match u {
                    UnaryOp::Not | UnaryOp::IsNaN | UnaryOp::IsInf { .. } => Some(DType::Bool),
                    _ => dt0,
                };
                let content = match u {
                    UnaryOp::Not => self
                        .ints(n, 0)
                        .map(|v| v.iter().map(|x| Sym::Int((*x == 0) as i64)).collect()),
                    UnaryOp::Neg => self
                        .ints(n, 0)
                        .and_then(|v| v.iter().map(|x| x.checked_neg().map(Sym::Int)).collect()),
                    UnaryOp::Abs => self
                        .ints(n, 0)
                        .and_then(|v| v.iter().map(|x| x.checked_abs().map(Sym::Int)).collect()),
                    UnaryOp::Relu => self
                        .ints(n, 0)
                        .map(|v| v.iter().map(|x| Sym::Int((*x).max(0))).collect()),
                    // Content holds whole numbers only.
                    UnaryOp::Floor | UnaryOp::Ceil | UnaryOp::Round => c0(),
                    _ => None,
                };
                NodeOut::one(typed(dt, s0), content)
            }
            Op::Binary(b) => self.binary(n, *b)?,
            Op::Variadic(_) => {
                let idx: Vec<usize> = (0..n.inputs.len()).collect();
                let mut first: Option<usize> = None;
                for &i in &idx {
                    if self.dt(n, i).is_some() {
                        match first {
                            None => first = Some(i),
                            Some(f) => self.check_same(n, f, i)?,
                        }
                    }
                }
                let shape = self.broadcast(n, &idx)?;
                NodeOut::one(typed(first.and_then(|f| self.dt(n, f)), shape), None)
            }
            // The bounds' dtype is not checked: for opset < 11 the frontend
            // makes them f32 constants whatever the input's type.
            Op::Clip => NodeOut::one(t0.cloned(), None),
            Op::Where => self.where_op(n)?,
            Op::Cast { to } => NodeOut::one(
                Some(vt(*to, s0)),
                cast_content(self.content(n, 0), dt0, *to),
            ),
            Op::CastLike => {
                let to = self.dt(n, 1);
                let content = to.and_then(|d| cast_content(self.content(n, 0), dt0, d));
                NodeOut::one(typed(to, s0), content)
            }
            Op::Identity => NodeOut::one(t0.cloned(), c0()),
            Op::Dropout => NodeOut {
                types: vec![t0.cloned(), Some(vt(DType::Bool, s0))],
                content: vec![c0(), None],
            },
            Op::Conv(a) => self.conv(n, a)?,
            Op::ConvTranspose(a) => self.conv_transpose(n, a)?,
            Op::BatchNormalization { .. } => {
                let c = s0
                    .as_ref()
                    .and_then(|s| s.get(1).cloned())
                    .unwrap_or(Dim::Unknown);
                let stat_dt = self.dt(n, 3).or(self.dt(n, 1)).or(dt0);
                let stat = typed(stat_dt, Some(vec![c]));
                NodeOut::many(vec![t0.cloned(), stat.clone(), stat])
            }
            Op::InstanceNormalization { .. } => {
                self.check_same(n, 0, 1)?;
                self.check_same(n, 0, 2)?;
                NodeOut::one(t0.cloned(), None)
            }
            Op::LayerNormalization { axis, .. } => {
                self.check_same(n, 0, 1)?;
                self.check_same(n, 0, 2)?;
                let stat_shape = s0.as_ref().and_then(|s| {
                    let a = norm_axis(*axis, s.len())?;
                    Some(
                        s.iter()
                            .enumerate()
                            .map(|(i, d)| if i < a { d.clone() } else { Dim::Known(1) })
                            .collect(),
                    )
                });
                let stat = Some(vt(DType::F32, stat_shape));
                NodeOut::many(vec![t0.cloned(), stat.clone(), stat])
            }
            Op::MaxPool(p) => self.pool(n, p, true)?,
            Op::AveragePool(p) => self.pool(n, p, false)?,
            Op::GlobalAveragePool | Op::GlobalMaxPool => {
                let shape = match &s0 {
                    Some(s) if s.len() >= 2 => Some(
                        s.iter()
                            .enumerate()
                            .map(|(i, d)| if i < 2 { d.clone() } else { Dim::Known(1) })
                            .collect(),
                    ),
                    Some(s) => {
                        return Err(nerr(
                            n,
                            format!(
                                "expects an input of rank 2 or more, got {}",
                                format_shape(s)
                            ),
                        ))
                    }
                    None => None,
                };
                NodeOut::one(typed(dt0, shape), None)
            }
            Op::Gemm {
                trans_a, trans_b, ..
            } => self.gemm(n, *trans_a, *trans_b)?,
            Op::MatMul => self.matmul(n)?,
            Op::Softmax { .. } | Op::LogSoftmax { .. } | Op::Trilu { .. } => {
                NodeOut::one(t0.cloned(), None)
            }
            Op::Resize(a) => self.resize(n, a)?,
            Op::Lstm(a) => self.lstm(n, a)?,
            Op::Quant(o) => self.family(n, |t, c, k| o.infer(t, c, k))?,
            Op::Index(o) => self.family(n, |t, c, k| o.infer(t, c, k))?,
            Op::Vision(o) => self.family(n, |t, c, k| o.infer(t, c, k))?,
            Op::Attn(o) => self.family(n, |t, c, k| o.infer(t, c, k))?,
            Op::Seq(o) => self.family(n, |t, c, k| o.infer(t, c, k))?,
            Op::Text(o) => self.family(n, |t, c, k| o.infer(t, c, k))?,
            Op::Fused(f) => match f {
                crate::FusedOp::Conv { conv, .. } => self.conv(n, conv)?,
                crate::FusedOp::ConvNhwc { conv, .. } => self.conv_nhwc(n, conv)?,
                crate::FusedOp::PointwiseDepthwise { dw, .. } => self.pointwise_depthwise(n, dw)?,
                crate::FusedOp::MatMul { .. } => self.matmul(n)?,
                crate::FusedOp::Attention { layout, .. } => self.attention(n, layout)?,
            },
            Op::Reshape { allowzero } => self.reshape(n, *allowzero)?,
            Op::Flatten { axis } => {
                let shape = match &s0 {
                    Some(s) => {
                        let r = s.len() as i128;
                        let a = *axis as i128;
                        let a = if a < 0 { a + r } else { a };
                        if a < 0 || a > r {
                            return Err(nerr(
                                n,
                                format!(
                                    "axis {axis} is out of range for input {}",
                                    format_shape(s)
                                ),
                            ));
                        }
                        let a = a as usize;
                        vec![dprod(&s[..a]), dprod(&s[a..])]
                    }
                    None => vec![Dim::Unknown, Dim::Unknown],
                };
                NodeOut::one(typed(dt0, Some(shape)), None)
            }
            Op::Transpose { perm } => {
                let shape = match (&s0, perm) {
                    (Some(s), p) => {
                        let perm: Vec<i64> = match p {
                            Some(p) => p.clone(),
                            None => (0..s.len() as i64).rev().collect(),
                        };
                        let ok = perm.len() == s.len() && norm_axes(&perm, s.len()).is_some();
                        let axes = if ok { norm_axes(&perm, s.len()) } else { None };
                        match axes {
                            Some(ax) => Some(ax.iter().map(|&a| s[a].clone()).collect()),
                            None => {
                                return Err(nerr(
                                    n,
                                    format!(
                                        "perm {perm:?} is not a permutation of the axes of {}",
                                        format_shape(s)
                                    ),
                                ))
                            }
                        }
                    }
                    (None, Some(p)) => unknown_dims(p.len()),
                    (None, None) => None,
                };
                NodeOut::one(typed(dt0, shape), None)
            }
            Op::Squeeze => self.squeeze(n)?,
            Op::Unsqueeze => {
                let shape = match (&s0, self.ints(n, 1)) {
                    (Some(s), Some(axes)) => {
                        let r = s.len().saturating_add(axes.len());
                        match norm_axes(&axes, r) {
                            Some(ax) => {
                                let mut it = s.iter();
                                Some(
                                    (0..r)
                                        .map(|j| {
                                            if ax.contains(&j) {
                                                Dim::Known(1)
                                            } else {
                                                it.next().cloned().unwrap_or(Dim::Unknown)
                                            }
                                        })
                                        .collect(),
                                )
                            }
                            None => {
                                return Err(nerr(
                                    n,
                                    format!("axes {axes:?} are invalid for an output of rank {r}"),
                                ))
                            }
                        }
                    }
                    (Some(s), None) => match self.sh(n, 1) {
                        Some([Dim::Known(k)]) => unknown_dims(s.len().saturating_add(*k)),
                        Some([]) => unknown_dims(s.len().saturating_add(1)),
                        _ => None,
                    },
                    _ => None,
                };
                NodeOut::one(typed(dt0, shape), c0())
            }
            Op::Concat { axis } => self.concat(n, *axis)?,
            Op::Split { axis, num_outputs } => self.split(n, *axis, *num_outputs)?,
            Op::Slice => self.slice(n)?,
            Op::Gather { axis } => self.gather(n, *axis)?,
            Op::GatherElements { .. } => {
                NodeOut::one(typed(dt0, self.sh(n, 1).map(|s| s.to_vec())), None)
            }
            Op::Expand => {
                let target = self.shape_input(n, 1);
                let shape = match (&s0, &target) {
                    (Some(s), Some(t)) => match broadcast_shapes(s, t) {
                        Some(b) => Some(b),
                        None => {
                            return Err(nerr(
                                n,
                                format!("cannot expand {} to {}", format_shape(s), format_shape(t)),
                            ))
                        }
                    },
                    _ => None,
                };
                NodeOut::one(typed(dt0, shape), None)
            }
            Op::Pad { .. } => self.pad(n)?,
            Op::Shape { start, end } => match &s0 {
                Some(s) => {
                    let r = s.len() as i128;
                    let norm = |v: i64| -> usize {
                        let v = v as i128;
                        let v = if v < 0 { v + r } else { v };
                        v.clamp(0, r) as usize
                    };
                    let st = norm(*start);
                    let en = norm(end.unwrap_or(i64::MAX));
                    let dims: &[Dim] = if en > st { &s[st..en] } else { &[] };
                    let content =
                        (dims.len() <= MAX_CONTENT).then(|| dims.iter().map(sym_of_dim).collect());
                    NodeOut::one(
                        Some(vt(DType::I64, Some(vec![Dim::Known(dims.len())]))),
                        content,
                    )
                }
                None => NodeOut::one(Some(vt(DType::I64, Some(vec![Dim::Unknown]))), None),
            },
            Op::Size => {
                let content = s0.as_ref().map(|s| vec![sym_of_dim(&dprod(s))]);
                NodeOut::one(Some(vt(DType::I64, Some(vec![]))), content)
            }
            Op::ConstantOfShape { value } => {
                let shape = self.shape_input(n, 0);
                let content = shape.as_ref().and_then(|s| {
                    if s.len() > 1 {
                        return None;
                    }
                    let numel = known_numel(s)?;
                    let v = const_content(value)?.first()?.clone();
                    (numel <= MAX_CONTENT).then(|| vec![v; numel])
                });
                NodeOut::one(Some(vt(value.dtype(), shape)), content)
            }
            Op::Range => self.range(n)?,
            Op::Tile => {
                let shape = match (&s0, self.content(n, 1)) {
                    (Some(s), Some(r)) if r.len() == s.len() => Some(
                        s.iter()
                            .zip(r)
                            .map(|(d, k)| dim_of_sym(&sym_arith(&sym_of_dim(d), k, Arith::Mul)))
                            .collect(),
                    ),
                    (Some(s), Some(r)) => {
                        return Err(nerr(
                            n,
                            format!(
                                "repeats has {} entries but the input {} has rank {}",
                                r.len(),
                                format_shape(s),
                                s.len()
                            ),
                        ))
                    }
                    (Some(s), None) => unknown_dims(s.len()),
                    (None, _) => None,
                };
                NodeOut::one(typed(dt0, shape), None)
            }
            Op::Reduce {
                op,
                keepdims,
                noop_with_empty_axes,
            } => self.reduce(n, *op, *keepdims, *noop_with_empty_axes)?,
            Op::ArgMax { axis, keepdims, .. } | Op::ArgMin { axis, keepdims, .. } => {
                let shape = match &s0 {
                    Some(s) => {
                        let Some(a) = norm_axis(*axis, s.len()) else {
                            return Err(nerr(
                                n,
                                format!(
                                    "axis {axis} is out of range for input {}",
                                    format_shape(s)
                                ),
                            ));
                        };
                        let mut out = s.clone();
                        if *keepdims {
                            out[a] = Dim::Known(1);
                        } else {
                            out.remove(a);
                        }
                        Some(out)
                    }
                    None => None,
                };
                NodeOut::one(Some(vt(DType::I64, shape)), None)
            }
            Op::If { .. } | Op::Loop { .. } => NodeOut::default(),
        })
    }

    /// A shape given as an input: its content as dims, else unknown dims of the
    /// input's length.
    fn shape_input(&self, n: &Node, i: usize) -> Option<Shape> {
        if let Some(c) = self.content(n, i) {
            return Some(c.iter().map(dim_of_sym).collect());
        }
        match self.sh(n, i) {
            Some([Dim::Known(k)]) => unknown_dims(*k),
            _ => None,
        }
    }

    fn binary(&self, n: &Node, op: BinaryOp) -> Result<NodeOut, IrError> {
        if op != BinaryOp::Pow {
            self.check_same(n, 0, 1)?;
        }
        let dt = if op.is_comparison() {
            Some(DType::Bool)
        } else if op == BinaryOp::Pow {
            self.dt(n, 0)
        } else {
            self.dt(n, 0).or(self.dt(n, 1))
        };
        let shape = self.broadcast(n, &[0, 1])?;
        let float = dt.is_some_and(|d| d.is_float());
        let content = (|| {
            let a = self.content(n, 0)?;
            let b = self.content(n, 1)?;
            let len = if a.len() == b.len() {
                a.len()
            } else if a.len() == 1 {
                b.len()
            } else if b.len() == 1 {
                a.len()
            } else {
                return None;
            };
            (0..len)
                .map(|i| {
                    let x = &a[if a.len() == 1 { 0 } else { i }];
                    let y = &b[if b.len() == 1 { 0 } else { i }];
                    binary_elem(op, x, y, float)
                })
                .collect::<Option<Vec<Sym>>>()
        })();
        Ok(NodeOut::one(typed(dt, shape), content))
    }

    fn where_op(&self, n: &Node) -> Result<NodeOut, IrError> {
        if let Some(d) = self.dt(n, 0) {
            if d != DType::Bool {
                return Err(nerr(
                    n,
                    format!("input 0 (the condition) is {d}, expected bool"),
                ));
            }
        }
        self.check_same(n, 1, 2)?;
        let dt = self.dt(n, 1).or(self.dt(n, 2));
        let shape = self.broadcast(n, &[0, 1, 2])?;
        let content = (|| {
            let c = self.ints(n, 0)?;
            let x = self.content(n, 1)?;
            let y = self.content(n, 2)?;
            let len = c.len().max(x.len()).max(y.len());
            if [c.len(), x.len(), y.len()]
                .iter()
                .any(|&l| l != len && l != 1)
            {
                return None;
            }
            let pick = |v: &[Sym], i: usize| v[if v.len() == 1 { 0 } else { i }].clone();
            Some(
                (0..len)
                    .map(|i| {
                        let ci = c[if c.len() == 1 { 0 } else { i }];
                        if ci != 0 {
                            pick(x, i)
                        } else {
                            pick(y, i)
                        }
                    })
                    .collect(),
            )
        })();
        Ok(NodeOut::one(typed(dt, shape), content))
    }

    fn conv(&self, n: &Node, a: &ConvAttrs) -> Result<NodeOut, IrError> {
        let (xs, ws) = (self.sh(n, 0), self.sh(n, 1));
        self.conv_of(n, a, xs, ws)
    }

    /// `FusedOp::ConvNhwc`: Conv's rule on X with its channels moved to
    /// axis 1, and the result's moved last.
    fn conv_nhwc(&self, n: &Node, a: &ConvAttrs) -> Result<NodeOut, IrError> {
        let xs = self.sh(n, 0).map(|x| {
            let mut s = x.to_vec();
            if s.len() >= 3 {
                let c = s.remove(s.len() - 1);
                s.insert(1, c);
            }
            s
        });
        let mut out = self.conv_of(n, a, xs.as_deref(), self.sh(n, 1))?;
        for s in out
            .types
            .iter_mut()
            .flatten()
            .filter_map(|t| t.shape.as_mut())
        {
            if s.len() >= 3 {
                let m = s.remove(1);
                s.push(m);
            }
        }
        Ok(out)
    }

    /// `FusedOp::PointwiseDepthwise`: Conv's rule for the depthwise conv
    /// (weights input 3) on X with its channels replaced by the pointwise
    /// conv's output channels (W1's first dim). X's channels must be W1's.
    fn pointwise_depthwise(&self, n: &Node, dw: &ConvAttrs) -> Result<NodeOut, IrError> {
        let (xs, w1) = (self.sh(n, 0), self.sh(n, 1));
        if let (Some(x), Some(w)) = (xs, w1) {
            let channels = (x.get(1).and_then(Dim::known), w.get(1).and_then(Dim::known));
            if x.len() != w.len() || matches!(channels, (Some(c), Some(wc)) if c != wc) {
                return Err(nerr(
                    n,
                    format!(
                        "input {} does not match the pointwise weights {}",
                        format_shape(x),
                        format_shape(w)
                    ),
                ));
            }
        }
        self.check_same(n, 0, 3)?;
        self.check_same(n, 0, 4)?;
        let mid = xs.map(|x| {
            let mut s = x.to_vec();
            if s.len() >= 2 {
                s[1] = w1.map_or(Dim::Unknown, |w| w[0].clone());
            }
            s
        });
        self.conv_of(n, dw, mid.as_deref(), self.sh(n, 3))
    }

    fn conv_of(
        &self,
        n: &Node,
        a: &ConvAttrs,
        xs: Option<&[Dim]>,
        ws: Option<&[Dim]>,
    ) -> Result<NodeOut, IrError> {
        self.check_same(n, 0, 1)?;
        self.check_same(n, 0, 2)?;
        let dt = self.dt(n, 0).or(self.dt(n, 1));
        let Some(rank) = xs.map(|s| s.len()).or(ws.map(|s| s.len())) else {
            return Ok(NodeOut::one(typed(dt, None), None));
        };
        if rank < 3 {
            return Err(nerr(
                n,
                format!(
                    "expects input and weight of rank 3 or more, got {} and {}",
                    fmt_opt(xs),
                    fmt_opt(ws)
                ),
            ));
        }
        if let (Some(x), Some(w)) = (xs, ws) {
            if x.len() != w.len() {
                return Err(nerr(
                    n,
                    format!(
                        "input {} and weight {} have different ranks",
                        format_shape(x),
                        format_shape(w)
                    ),
                ));
            }
            if let (Some(c), Some(wc)) = (x[1].known(), w[1].known()) {
                let g = a.group.max(1);
                if wc.checked_mul(g) != Some(c) {
                    return Err(nerr(
                        n,
                        format!(
                            "input {} has {c} channels but weight {} with group {g} expects {}",
                            format_shape(x),
                            format_shape(w),
                            wc.saturating_mul(g)
                        ),
                    ));
                }
            }
        }
        let spatial = rank - 2;
        let mut out = vec![
            xs.map_or(Dim::Unknown, |x| x[0].clone()),
            ws.map_or(Dim::Unknown, |w| w[0].clone()),
        ];
        for i in 0..spatial {
            let input = xs.map_or(Dim::Unknown, |x| x[2 + i].clone());
            let k = if a.kernel_shape.is_empty() {
                ws.and_then(|w| w[2 + i].known())
            } else {
                attr_at(&a.kernel_shape, spatial, i, 0)
            };
            let d = window_out_dim(
                &input,
                k,
                attr_at(&a.strides, spatial, i, 1),
                attr_at(&a.dilations, spatial, i, 1),
                pads_at(&a.pads, spatial, i),
                a.auto_pad,
                false,
            )
            .map_err(|m| nerr(n, format!("spatial axis {i} of input {}: {m}", fmt_opt(xs))))?;
            out.push(d);
        }
        Ok(NodeOut::one(typed(dt, Some(out)), None))
    }

    fn conv_transpose(&self, n: &Node, a: &ConvTransposeAttrs) -> Result<NodeOut, IrError> {
        self.check_same(n, 0, 1)?;
        self.check_same(n, 0, 2)?;
        let c = &a.conv;
        let dt = self.dt(n, 0).or(self.dt(n, 1));
        let xs = self.sh(n, 0);
        let ws = self.sh(n, 1);
        let Some(rank) = xs.map(|s| s.len()).or(ws.map(|s| s.len())) else {
            return Ok(NodeOut::one(typed(dt, None), None));
        };
        if rank < 3 {
            return Err(nerr(
                n,
                format!(
                    "expects input and weight of rank 3 or more, got {} and {}",
                    fmt_opt(xs),
                    fmt_opt(ws)
                ),
            ));
        }
        if let (Some(x), Some(w)) = (xs, ws) {
            if x.len() != w.len() {
                return Err(nerr(
                    n,
                    format!(
                        "input {} and weight {} have different ranks",
                        format_shape(x),
                        format_shape(w)
                    ),
                ));
            }
            if let (Some(ci), Some(wc)) = (x[1].known(), w[0].known()) {
                if ci != wc {
                    return Err(nerr(
                        n,
                        format!(
                            "input {} has {ci} channels but weight {} expects {wc}",
                            format_shape(x),
                            format_shape(w)
                        ),
                    ));
                }
            }
        }
        let spatial = rank - 2;
        let g = c.group.max(1);
        let m = ws.map_or(Dim::Unknown, |w| darith(&w[1], &Dim::Known(g), Arith::Mul));
        let mut out = vec![xs.map_or(Dim::Unknown, |x| x[0].clone()), m];
        if !a.output_shape.is_empty() {
            let os = &a.output_shape;
            if os.len() >= spatial {
                out.extend(os[os.len() - spatial..].iter().map(|&v| Dim::Known(v)));
            } else {
                out.extend(vec![Dim::Unknown; spatial]);
            }
            return Ok(NodeOut::one(typed(dt, Some(out)), None));
        }
        for i in 0..spatial {
            let input = xs.map_or(Dim::Unknown, |x| x[2 + i].clone());
            let d = (|| -> Option<Dim> {
                let s = attr_at(&c.strides, spatial, i, 1)?;
                if matches!(c.auto_pad, AutoPad::SameUpper | AutoPad::SameLower) {
                    return Some(darith(&input, &Dim::Known(s), Arith::Mul));
                }
                let k = if c.kernel_shape.is_empty() {
                    ws.and_then(|w| w[2 + i].known())?
                } else {
                    attr_at(&c.kernel_shape, spatial, i, 0)?
                };
                let dil = attr_at(&c.dilations, spatial, i, 1)?;
                let op = attr_at(&a.output_padding, spatial, i, 0)?;
                let (pb, pe) = if c.auto_pad == AutoPad::Valid {
                    (0, 0)
                } else {
                    pads_at(&c.pads, spatial, i)?
                };
                let eff = (k as i128 - 1).checked_mul(dil as i128)?.checked_add(1)?;
                let off = i64::try_from(op as i128 + eff - pb as i128 - pe as i128).ok()?;
                let base = darith(&dadd_i(&input, -1), &Dim::Known(s), Arith::Mul);
                Some(dadd_i(&base, off))
            })()
            .unwrap_or(Dim::Unknown);
            out.push(d);
        }
        Ok(NodeOut::one(typed(dt, Some(out)), None))
    }

    fn pool(&self, n: &Node, p: &PoolAttrs, indices: bool) -> Result<NodeOut, IrError> {
        let dt = self.dt(n, 0);
        let shape = match self.sh(n, 0) {
            Some(x) if x.len() < 3 => {
                return Err(nerr(
                    n,
                    format!(
                        "expects an input of rank 3 or more, got {}",
                        format_shape(x)
                    ),
                ))
            }
            Some(x) => {
                let spatial = x.len() - 2;
                let mut out = vec![x[0].clone(), x[1].clone()];
                for i in 0..spatial {
                    let k = if p.kernel_shape.len() == spatial {
                        Some(p.kernel_shape[i])
                    } else {
                        None
                    };
                    let d = window_out_dim(
                        &x[2 + i],
                        k,
                        attr_at(&p.strides, spatial, i, 1),
                        attr_at(&p.dilations, spatial, i, 1),
                        pads_at(&p.pads, spatial, i),
                        p.auto_pad,
                        p.ceil_mode,
                    )
                    .map_err(|m| {
                        nerr(
                            n,
                            format!("spatial axis {i} of input {}: {m}", format_shape(x)),
                        )
                    })?;
                    out.push(d);
                }
                Some(out)
            }
            None => None,
        };
        let mut types = vec![typed(dt, shape.clone())];
        if indices {
            types.push(Some(vt(DType::I64, shape)));
        }
        Ok(NodeOut::many(types))
    }

    fn gemm(&self, n: &Node, ta: bool, tb: bool) -> Result<NodeOut, IrError> {
        self.check_same(n, 0, 1)?;
        self.check_same(n, 0, 2)?;
        let dt = self.dt(n, 0).or(self.dt(n, 1));
        let a = self.sh(n, 0);
        let b = self.sh(n, 1);
        for (i, s) in [(0, a), (1, b)] {
            if let Some(s) = s {
                if s.len() != 2 {
                    return Err(nerr(
                        n,
                        format!(
                            "input {i} is {}, expected a matrix (rank 2)",
                            format_shape(s)
                        ),
                    ));
                }
            }
        }
        let (m, ka) = match a {
            Some(a) if ta => (a[1].clone(), a[0].clone()),
            Some(a) => (a[0].clone(), a[1].clone()),
            None => (Dim::Unknown, Dim::Unknown),
        };
        let (kb, nn) = match b {
            Some(b) if tb => (b[1].clone(), b[0].clone()),
            Some(b) => (b[0].clone(), b[1].clone()),
            None => (Dim::Unknown, Dim::Unknown),
        };
        if let (Some(x), Some(y)) = (ka.known(), kb.known()) {
            if x != y {
                return Err(nerr(
                    n,
                    format!(
                        "inner dims differ: A is {} (trans_a={ta}) and B is {} (trans_b={tb})",
                        fmt_opt(a),
                        fmt_opt(b)
                    ),
                ));
            }
        }
        Ok(NodeOut::one(typed(dt, Some(vec![m, nn])), None))
    }

    fn matmul(&self, n: &Node) -> Result<NodeOut, IrError> {
        self.check_same(n, 0, 1)?;
        let dt = self.dt(n, 0).or(self.dt(n, 1));
        let (Some(a), Some(b)) = (self.sh(n, 0), self.sh(n, 1)) else {
            return Ok(NodeOut::one(typed(dt, None), None));
        };
        if a.is_empty() || b.is_empty() {
            return Err(nerr(
                n,
                format!(
                    "inputs must have rank 1 or more, got {} and {}",
                    format_shape(a),
                    format_shape(b)
                ),
            ));
        }
        let a1 = a.len() == 1;
        let b1 = b.len() == 1;
        let mut a2 = a.to_vec();
        let mut b2 = b.to_vec();
        if a1 {
            a2.insert(0, Dim::Known(1));
        }
        if b1 {
            b2.push(Dim::Known(1));
        }
        let (ra, rb) = (a2.len(), b2.len());
        if let (Some(x), Some(y)) = (a2[ra - 1].known(), b2[rb - 2].known()) {
            if x != y {
                return Err(nerr(
                    n,
                    format!(
                        "inner dims differ: {} x {}",
                        format_shape(a),
                        format_shape(b)
                    ),
                ));
            }
        }
        let Some(mut out) = broadcast_shapes(&a2[..ra - 2], &b2[..rb - 2]) else {
            return Err(nerr(
                n,
                format!(
                    "batch dims of {} and {} do not broadcast",
                    format_shape(a),
                    format_shape(b)
                ),
            ));
        };
        if !a1 {
            out.push(a2[ra - 2].clone());
        }
        if !b1 {
            out.push(b2[rb - 1].clone());
        }
        Ok(NodeOut::one(typed(dt, Some(out)), None))
    }

    /// `FusedOp::Attention`: Q `[..., S, D]`, Kt `[..., D, T]`, V `[..., T, E]`
    /// with the same rank -> `[..., S, E]` (Q's leading dims).
    fn attention(&self, n: &Node, layout: &crate::AttnLayout) -> Result<NodeOut, IrError> {
        self.check_same(n, 0, 1)?;
        self.check_same(n, 0, 2)?;
        let dt = self.dt(n, 0);
        let (Some(q), Some(k), Some(v)) = (self.sh(n, 0), self.sh(n, 1), self.sh(n, 2)) else {
            return Ok(NodeOut::one(typed(dt, None), None));
        };
        // The core's operands: the inputs through their absorbed Transposes.
        let mut qkv = Vec::with_capacity(3);
        for (i, (what, sh)) in [("Q", q), ("Kt", k), ("V", v)].into_iter().enumerate() {
            let perm = layout.inputs[i].as_deref();
            let t = crate::AttnLayout::permuted(sh, perm).ok_or_else(|| {
                nerr(
                    n,
                    format!(
                        "{what}: perm {perm:?} is not a permutation of {}",
                        format_shape(sh)
                    ),
                )
            })?;
            qkv.push(t);
        }
        let (q, k, v) = (&qkv[0][..], &qkv[1][..], &qkv[2][..]);
        let r = q.len();
        if r < 2 || k.len() != r || v.len() != r {
            return Err(nerr(
                n,
                format!(
                    "Q, Kt and V must have one rank of 2 or more, got {}, {} and {}",
                    format_shape(q),
                    format_shape(k),
                    format_shape(v)
                ),
            ));
        }
        for (what, x, y) in [
            ("Q x Kt", &q[r - 1], &k[r - 2]),
            ("Kt x V", &k[r - 1], &v[r - 2]),
        ] {
            if let (Some(a), Some(b)) = (x.known(), y.known()) {
                if a != b {
                    return Err(nerr(n, format!("inner dims of {what} differ: {a} vs {b}")));
                }
            }
        }
        let mut out = q.to_vec();
        out[r - 1] = v[r - 1].clone();
        let perm = layout.out.as_deref();
        let out = crate::AttnLayout::permuted(&out, perm)
            .filter(|_| perm.is_none_or(|p| p.last() == Some(&(r - 1))))
            .ok_or_else(|| {
                nerr(
                    n,
                    format!(
                        "output perm {perm:?} is not a permutation of rank {r} keeping the last axis"
                    ),
                )
            })?;
        Ok(NodeOut::one(typed(dt, Some(out)), None))
    }

    fn resize(&self, n: &Node, a: &ResizeAttrs) -> Result<NodeOut, IrError> {
        let dt = self.dt(n, 0);
        let xs = self.sh(n, 0);
        let sizes = if self.present(n, 3) {
            self.content(n, 3).filter(|c| !c.is_empty())
        } else {
            None
        };
        let scales = if self.present(n, 2) {
            self.floats(n, 2).filter(|c| !c.is_empty())
        } else {
            None
        };
        let rank = match (xs, sizes, scales.as_ref()) {
            (Some(x), _, _) => x.len(),
            (None, Some(s), _) if a.axes.is_empty() => s.len(),
            (None, None, Some(s)) if a.axes.is_empty() => s.len(),
            _ => return Ok(NodeOut::one(typed(dt, None), None)),
        };
        let mut out: Shape = match xs {
            Some(x) => x.to_vec(),
            None => match unknown_dims(rank) {
                Some(u) => u,
                None => return Ok(NodeOut::one(typed(dt, None), None)),
            },
        };
        let axes: Vec<usize> = if a.axes.is_empty() {
            (0..rank).collect()
        } else {
            match norm_axes(&a.axes, rank) {
                Some(ax) => ax,
                None => return Ok(NodeOut::one(typed(dt, unknown_dims(rank)), None)),
            }
        };
        if let Some(sz) = sizes {
            if sz.len() != axes.len() {
                for &ax in &axes {
                    out[ax] = Dim::Unknown;
                }
            } else if a.keep_aspect_ratio == KeepAspect::Stretch {
                for (i, &ax) in axes.iter().enumerate() {
                    out[ax] = dim_of_sym(&sz[i]);
                }
            } else {
                let ratio: Option<Vec<f64>> = axes
                    .iter()
                    .zip(sz)
                    .map(|(&ax, s)| match (out[ax].known(), s) {
                        (Some(i), Sym::Int(v)) if i > 0 && *v >= 0 => Some(*v as f64 / i as f64),
                        _ => None,
                    })
                    .collect();
                let scale = ratio.and_then(|r| {
                    let it = r.into_iter();
                    if a.keep_aspect_ratio == KeepAspect::NotLarger {
                        it.reduce(f64::min)
                    } else {
                        it.reduce(f64::max)
                    }
                });
                for &ax in &axes {
                    out[ax] = match (scale, out[ax].known()) {
                        (Some(sc), Some(i)) => float_dim((sc * i as f64 + 0.5).floor()),
                        _ => Dim::Unknown,
                    };
                }
            }
        } else if let Some(sc) = scales {
            let roi = if a.coord == CoordTransform::TfCropAndResize {
                self.floats(n, 1)
                    .filter(|r| r.len() == 2 * axes.len() || r.len() == 2 * rank)
            } else {
                None
            };
            if sc.len() != axes.len() {
                for &ax in &axes {
                    out[ax] = Dim::Unknown;
                }
            } else {
                for (i, &ax) in axes.iter().enumerate() {
                    let factor = if a.coord == CoordTransform::TfCropAndResize {
                        match &roi {
                            Some(r) => {
                                let (s_i, e_i) = if r.len() == 2 * axes.len() {
                                    (i, i + axes.len())
                                } else {
                                    (ax, ax + rank)
                                };
                                Some(r[e_i] - r[s_i])
                            }
                            None => None,
                        }
                    } else {
                        Some(1.0)
                    };
                    out[ax] = match factor {
                        Some(f) => scale_dim(&out[ax], sc[i] * f, f == 1.0),
                        None => Dim::Unknown,
                    };
                }
            }
        } else if self.present(n, 2) || self.present(n, 3) {
            for &ax in &axes {
                out[ax] = Dim::Unknown;
            }
        }
        Ok(NodeOut::one(typed(dt, Some(out)), None))
    }

    fn lstm(&self, n: &Node, a: &LstmAttrs) -> Result<NodeOut, IrError> {
        self.check_same(n, 0, 1)?;
        self.check_same(n, 0, 2)?;
        let dt = self.dt(n, 0).or(self.dt(n, 1));
        let x = self.sh(n, 0);
        if let Some(x) = x {
            if x.len() != 3 {
                return Err(nerr(
                    n,
                    format!("input X is {}, expected rank 3", format_shape(x)),
                ));
            }
        }
        let dirs = Dim::Known(if a.direction == RnnDirection::Bidirectional {
            2
        } else {
            1
        });
        let h = if a.hidden_size > 0 {
            Dim::Known(a.hidden_size)
        } else {
            match self.sh(n, 2) {
                Some([_, _, h]) => h.clone(),
                _ => Dim::Unknown,
            }
        };
        let (seq, batch) = match x {
            Some(x) if a.layout == 1 => (x[1].clone(), x[0].clone()),
            Some(x) => (x[0].clone(), x[1].clone()),
            None => (Dim::Unknown, Dim::Unknown),
        };
        let (y, yh) = if a.layout == 1 {
            (
                vec![batch.clone(), seq, dirs.clone(), h.clone()],
                vec![batch, dirs, h],
            )
        } else {
            (
                vec![seq, dirs.clone(), batch.clone(), h.clone()],
                vec![dirs, batch, h],
            )
        };
        Ok(NodeOut::many(vec![
            typed(dt, Some(y)),
            typed(dt, Some(yh.clone())),
            typed(dt, Some(yh)),
        ]))
    }

    fn reshape(&self, n: &Node, allowzero: bool) -> Result<NodeOut, IrError> {
        let dt = self.dt(n, 0);
        let data = self.sh(n, 0);
        let shape = match self.content(n, 1) {
            Some(t) => reshape_dims(data, t, allowzero).map_err(|m| nerr(n, m))?,
            None => match self.sh(n, 1) {
                Some([Dim::Known(k)]) => unknown_dims(*k),
                _ => None,
            },
        };
        let content = match &shape {
            Some(s) if s.len() <= 1 => self.content(n, 0).map(|c| c.to_vec()),
            _ => None,
        };
        Ok(NodeOut::one(typed(dt, shape), content))
    }

    fn squeeze(&self, n: &Node) -> Result<NodeOut, IrError> {
        let dt = self.dt(n, 0);
        let Some(s) = self.sh(n, 0) else {
            return Ok(NodeOut::one(typed(dt, None), None));
        };
        let shape = if !self.present(n, 1) {
            if s.iter().all(|d| d.known().is_some()) {
                Some(s.iter().filter(|d| d.known() != Some(1)).cloned().collect())
            } else {
                None
            }
        } else {
            match self.ints(n, 1) {
                Some(axes) => {
                    let Some(ax) = norm_axes(&axes, s.len()) else {
                        return Err(nerr(
                            n,
                            format!("axes {axes:?} are invalid for input {}", format_shape(s)),
                        ));
                    };
                    for &a in &ax {
                        if let Some(v) = s[a].known() {
                            if v != 1 {
                                return Err(nerr(
                                    n,
                                    format!(
                                        "cannot squeeze axis {a} of {}: it is not 1",
                                        format_shape(s)
                                    ),
                                ));
                            }
                        }
                    }
                    Some(
                        s.iter()
                            .enumerate()
                            .filter(|(i, _)| !ax.contains(i))
                            .map(|(_, d)| d.clone())
                            .collect(),
                    )
                }
                None => match self.sh(n, 1) {
                    Some([Dim::Known(k)]) => unknown_dims(s.len().saturating_sub(*k)),
                    _ => None,
                },
            }
        };
        let content = match &shape {
            Some(o) if o.len() <= 1 => self.content(n, 0).map(|c| c.to_vec()),
            _ => None,
        };
        Ok(NodeOut::one(typed(dt, shape), content))
    }

    fn concat(&self, n: &Node, axis: i64) -> Result<NodeOut, IrError> {
        let idx: Vec<usize> = (0..n.inputs.len())
            .filter(|&i| self.present(n, i))
            .collect();
        let mut first: Option<usize> = None;
        for &i in &idx {
            if self.dt(n, i).is_some() {
                match first {
                    None => first = Some(i),
                    Some(f) => self.check_same(n, f, i)?,
                }
            }
        }
        let dt = first.and_then(|f| self.dt(n, f));
        let mut rank: Option<(usize, &[Dim])> = None;
        for &i in &idx {
            if let Some(s) = self.sh(n, i) {
                match rank {
                    None => rank = Some((i, s)),
                    Some((j, t)) if t.len() != s.len() => {
                        return Err(nerr(
                            n,
                            format!(
                                "input {i} is {} but input {j} is {}: ranks differ",
                                format_shape(s),
                                format_shape(t)
                            ),
                        ))
                    }
                    _ => {}
                }
            }
        }
        let Some((_, proto)) = rank else {
            return Ok(NodeOut::one(typed(dt, None), None));
        };
        let r = proto.len();
        let Some(a) = norm_axis(axis, r) else {
            return Err(nerr(
                n,
                format!("axis {axis} is out of range for inputs of rank {r}"),
            ));
        };
        let mut out = Vec::with_capacity(r);
        for k in 0..r {
            if k == a {
                let mut sum = Dim::Known(0);
                for &i in &idx {
                    let d = self.sh(n, i).map_or(Dim::Unknown, |s| s[k].clone());
                    sum = darith(&sum, &d, Arith::Add);
                }
                out.push(sum);
            } else {
                let mut acc = Dim::Unknown;
                let mut from: Option<usize> = None;
                for &i in &idx {
                    if let Some(s) = self.sh(n, i) {
                        match merge_same(&acc, &s[k]) {
                            Some(m) => acc = m,
                            None => {
                                let j = from.unwrap_or(i);
                                return Err(nerr(
                                    n,
                                    format!(
                                        "input {i} is {} but input {j} is {}: axis {k} differs",
                                        format_shape(s),
                                        fmt_opt(self.sh(n, j))
                                    ),
                                ));
                            }
                        }
                        if s[k].known().is_some() && from.is_none() {
                            from = Some(i);
                        }
                    }
                }
                out.push(acc);
            }
        }
        let content = if r == 1 {
            let mut all = Vec::new();
            let mut ok = true;
            for &i in &idx {
                match self.content(n, i) {
                    Some(c) if all.len() + c.len() <= MAX_CONTENT => all.extend_from_slice(c),
                    _ => {
                        ok = false;
                        break;
                    }
                }
            }
            ok.then_some(all)
        } else {
            None
        };
        Ok(NodeOut::one(typed(dt, Some(out)), content))
    }

    fn split(&self, n: &Node, axis: i64, num_outputs: usize) -> Result<NodeOut, IrError> {
        let dt = self.dt(n, 0);
        let outs = n.outputs.len();
        let Some(s) = self.sh(n, 0) else {
            return Ok(NodeOut::many(vec![typed(dt, None); outs]));
        };
        let Some(a) = norm_axis(axis, s.len()) else {
            return Err(nerr(
                n,
                format!("axis {axis} is out of range for input {}", format_shape(s)),
            ));
        };
        let sizes: Option<Vec<Dim>> = if self.present(n, 1) {
            self.content(n, 1)
                .filter(|c| c.len() == outs)
                .map(|c| c.iter().map(dim_of_sym).collect())
        } else {
            let parts = if num_outputs > 0 { num_outputs } else { outs };
            if parts == 0 || parts != outs {
                None
            } else {
                match s[a].known() {
                    Some(d) => {
                        let chunk = d.div_ceil(parts);
                        let last = (chunk as i128) * (parts as i128 - 1);
                        let last = d as i128 - last;
                        let mut v = vec![Dim::Known(chunk); parts - 1];
                        v.push(
                            usize::try_from(last)
                                .map(Dim::Known)
                                .unwrap_or(Dim::Unknown),
                        );
                        Some(v)
                    }
                    None => {
                        let each = (|| {
                            let p = poly_of(&s[a])?;
                            let q = p.div_exact(&Poly::constant(parts as i128))?;
                            from_poly(&q)
                        })()
                        .unwrap_or(Dim::Unknown);
                        Some(vec![each; parts])
                    }
                }
            }
        };
        let mut types = Vec::with_capacity(outs);
        let mut content = Vec::with_capacity(outs);
        let src = if s.len() == 1 {
            self.content(n, 0)
        } else {
            None
        };
        let mut offset = 0usize;
        for k in 0..outs {
            let mut o = s.to_vec();
            let d = sizes
                .as_ref()
                .and_then(|v| v.get(k).cloned())
                .unwrap_or(Dim::Unknown);
            let piece = match (src, d.known()) {
                (Some(c), Some(len)) => {
                    let end = offset.checked_add(len).filter(|&e| e <= c.len());
                    let p = end.map(|e| c[offset..e].to_vec());
                    offset = end.unwrap_or(usize::MAX);
                    p
                }
                _ => {
                    offset = usize::MAX;
                    None
                }
            };
            o[a] = d;
            types.push(typed(dt, Some(o)));
            content.push(piece);
        }
        Ok(NodeOut { types, content })
    }

    fn slice(&self, n: &Node) -> Result<NodeOut, IrError> {
        let dt = self.dt(n, 0);
        let Some(s) = self.sh(n, 0) else {
            return Ok(NodeOut::one(typed(dt, None), None));
        };
        let r = s.len();
        let starts = self.content(n, 1);
        let ends = self.content(n, 2);
        let axes: Option<Vec<i64>> = if self.present(n, 3) {
            self.ints(n, 3)
        } else {
            starts
                .or(ends)
                .map(|st| (0..st.len() as i64).collect())
                .or_else(|| match self.sh(n, 1) {
                    Some([Dim::Known(k)]) if *k <= r => Some((0..*k as i64).collect()),
                    _ => None,
                })
        };
        let steps: Option<Vec<i64>> = if self.present(n, 4) {
            self.ints(n, 4)
        } else {
            axes.as_ref().map(|a| vec![1; a.len()])
        };
        let mut out = s.to_vec();
        let norm = axes.as_ref().and_then(|a| norm_axes(a, r));
        match (norm, starts, ends, &steps) {
            (Some(ax), Some(st), Some(en), Some(sp))
                if st.len() == ax.len() && en.len() == ax.len() && sp.len() == ax.len() =>
            {
                for (i, &a) in ax.iter().enumerate() {
                    out[a] = slice_len(&s[a], &st[i], &en[i], sp[i]);
                }
            }
            (Some(ax), _, _, _) => {
                for &a in &ax {
                    out[a] = Dim::Unknown;
                }
            }
            (None, _, _, _) => out = vec![Dim::Unknown; r],
        }
        let content = (|| {
            if r != 1 {
                return None;
            }
            let c = self.content(n, 0)?;
            let st = self.ints(n, 1)?;
            let en = self.ints(n, 2)?;
            let ax = axes.as_ref()?;
            let sp = steps.as_ref()?;
            if st.len() != 1 || en.len() != 1 || ax.len() != 1 || sp.len() != 1 {
                return None;
            }
            norm_axis(ax[0], 1)?;
            let idx = slice_indices(c.len(), st[0], en[0], sp[0])?;
            Some(idx.into_iter().map(|i| c[i].clone()).collect())
        })();
        Ok(NodeOut::one(typed(dt, Some(out)), content))
    }

    fn gather(&self, n: &Node, axis: i64) -> Result<NodeOut, IrError> {
        let dt = self.dt(n, 0);
        if let Some(d) = self.dt(n, 1) {
            if !d.is_int() {
                return Err(nerr(
                    n,
                    format!("indices (input 1) are {d}, expected integers"),
                ));
            }
        }
        let (Some(ds), Some(is)) = (self.sh(n, 0), self.sh(n, 1)) else {
            return Ok(NodeOut::one(typed(dt, None), None));
        };
        let Some(a) = norm_axis(axis, ds.len()) else {
            return Err(nerr(
                n,
                format!("axis {axis} is out of range for data {}", format_shape(ds)),
            ));
        };
        let mut out: Shape = ds[..a].to_vec();
        out.extend_from_slice(is);
        out.extend_from_slice(&ds[a + 1..]);
        let content = (|| {
            if ds.len() != 1 {
                return None;
            }
            let c = self.content(n, 0)?;
            let idx = self.ints(n, 1)?;
            let len = c.len() as i128;
            idx.iter()
                .map(|&i| {
                    let i = i as i128;
                    let i = if i < 0 { i + len } else { i };
                    (i >= 0 && i < len).then(|| c[i as usize].clone())
                })
                .collect()
        })();
        Ok(NodeOut::one(typed(dt, Some(out)), content))
    }

    fn pad(&self, n: &Node) -> Result<NodeOut, IrError> {
        let dt = self.dt(n, 0);
        let Some(s) = self.sh(n, 0) else {
            return Ok(NodeOut::one(typed(dt, None), None));
        };
        let r = s.len();
        let axes: Option<Vec<usize>> = if self.present(n, 3) {
            self.ints(n, 3).and_then(|a| norm_axes(&a, r))
        } else {
            Some((0..r).collect())
        };
        let mut out = s.to_vec();
        match (axes, self.content(n, 1)) {
            (Some(ax), Some(p)) if p.len() == 2 * ax.len() => {
                for (i, &a) in ax.iter().enumerate() {
                    let d = sym_arith(&sym_of_dim(&s[a]), &p[i], Arith::Add);
                    let d = sym_arith(&d, &p[i + ax.len()], Arith::Add);
                    if let Sym::Int(v) = d {
                        if v < 0 {
                            return Err(nerr(
                                n,
                                format!("pads make axis {a} of {} negative", format_shape(s)),
                            ));
                        }
                    }
                    out[a] = dim_of_sym(&d);
                }
            }
            (Some(ax), _) => {
                for &a in &ax {
                    out[a] = Dim::Unknown;
                }
            }
            (None, _) => out = vec![Dim::Unknown; r],
        }
        Ok(NodeOut::one(typed(dt, Some(out)), None))
    }

    fn range(&self, n: &Node) -> Result<NodeOut, IrError> {
        self.check_same(n, 0, 1)?;
        self.check_same(n, 0, 2)?;
        let dt = self.dt(n, 0).or(self.dt(n, 1)).or(self.dt(n, 2));
        let (st, li, de) = (self.scalar(n, 0), self.scalar(n, 1), self.scalar(n, 2));
        let mut content = None;
        let len = match (&st, &li, &de) {
            (Some(Sym::Int(s)), Some(Sym::Int(l)), Some(Sym::Int(d))) => {
                let (s, l, d) = (*s as i128, *l as i128, *d as i128);
                if d == 0 {
                    Dim::Unknown
                } else {
                    let num = l - s;
                    let q = num / d + i128::from(num % d != 0 && ((num < 0) == (d < 0)));
                    let q = q.max(0);
                    if q <= MAX_CONTENT as i128 {
                        content = (0..q)
                            .map(|i| i64::try_from(s + i * d).ok().map(Sym::Int))
                            .collect::<Option<Vec<Sym>>>();
                    }
                    usize::try_from(q).map(Dim::Known).unwrap_or(Dim::Unknown)
                }
            }
            (Some(s), Some(l), Some(Sym::Int(k))) if *k > 0 => {
                let diff = sym_arith(l, s, Arith::Sub);
                let num = sym_arith(&diff, &Sym::Int(*k - 1), Arith::Add);
                dim_of_sym(&sym_arith(&num, &Sym::Int(*k), Arith::Div))
            }
            _ => match (self.floats(n, 0), self.floats(n, 1), self.floats(n, 2)) {
                (Some(s), Some(l), Some(d)) if s.len() == 1 && l.len() == 1 && d.len() == 1 => {
                    let q = ((l[0] - s[0]) / d[0]).ceil();
                    if q.is_finite() {
                        float_dim(q.max(0.0))
                    } else {
                        Dim::Unknown
                    }
                }
                _ => Dim::Unknown,
            },
        };
        if dt.is_some_and(|d| d.is_float()) {
            content = None;
        }
        Ok(NodeOut::one(typed(dt, Some(vec![len])), content))
    }

    fn reduce(
        &self,
        n: &Node,
        op: ReduceOp,
        keepdims: bool,
        noop: bool,
    ) -> Result<NodeOut, IrError> {
        let dt = self.dt(n, 0);
        let Some(s) = self.sh(n, 0) else {
            return Ok(NodeOut::one(typed(dt, None), None));
        };
        let r = s.len();
        let axes: Option<Vec<i64>> = if self.present(n, 1) {
            self.ints(n, 1)
        } else {
            Some(Vec::new())
        };
        let (shape, reduced): (Option<Shape>, Option<Vec<usize>>) = match axes {
            Some(ax) if ax.is_empty() => {
                if noop {
                    (Some(s.to_vec()), Some(vec![]))
                } else if keepdims {
                    (Some(vec![Dim::Known(1); r]), Some((0..r).collect()))
                } else {
                    (Some(vec![]), Some((0..r).collect()))
                }
            }
            Some(ax) => {
                let Some(ax) = norm_axes(&ax, r) else {
                    return Err(nerr(
                        n,
                        format!("axes {ax:?} are invalid for input {}", format_shape(s)),
                    ));
                };
                let shape = if keepdims {
                    s.iter()
                        .enumerate()
                        .map(|(i, d)| {
                            if ax.contains(&i) {
                                Dim::Known(1)
                            } else {
                                d.clone()
                            }
                        })
                        .collect()
                } else {
                    s.iter()
                        .enumerate()
                        .filter(|(i, _)| !ax.contains(i))
                        .map(|(_, d)| d.clone())
                        .collect()
                };
                (Some(shape), Some(ax))
            }
            None => (if keepdims { unknown_dims(r) } else { None }, None),
        };
        let content = (|| {
            if r != 1 || reduced.as_deref() != Some(&[0]) {
                return None;
            }
            let c = self.content(n, 0)?;
            let (init, f) = match op {
                ReduceOp::Sum => (Sym::Int(0), Arith::Add),
                ReduceOp::Prod => (Sym::Int(1), Arith::Mul),
                _ => return None,
            };
            Some(vec![c.iter().fold(init, |acc, x| sym_arith(&acc, x, f))])
        })();
        Ok(NodeOut::one(typed(dt, shape), content))
    }

    // ---- control flow ------------------------------------------------------

    fn control_flow(&mut self, node: &mut Node) -> Result<NodeOut, IrError> {
        let label = format!("node '{}' ({})", node.name, node.op.name());
        let cond = self.dt(node, 0);
        let ins: Vec<Option<ValueType>> = (0..node.inputs.len())
            .map(|i| self.ty(node, i).cloned())
            .collect();
        let trip = match self.scalar(node, 0) {
            Some(Sym::Int(m)) if node.input(1).is_none() => Some(m),
            _ => None,
        };
        let n_out = node.outputs.len();
        match &mut node.op {
            Op::If {
                then_branch,
                else_branch,
            } => self.infer_if(&label, cond, then_branch, else_branch, n_out),
            Op::Loop { body } => self.infer_loop(&label, &ins, trip, body, n_out),
            _ => Ok(NodeOut::default()),
        }
    }

    fn sub_infer(
        &mut self,
        g: &mut Graph,
        label: &str,
        part: &str,
    ) -> Result<Vec<String>, IrError> {
        let mut w = Vec::new();
        infer_in(g, &self.visible, self.scope.clone(), &mut w, self.depth + 1)
            .map_err(|e| IrError::Invalid(format!("in the {part} of {label}: {e}")))?;
        Ok(w.into_iter()
            .map(|m| format!("in the {part} of {label}: {m}"))
            .collect())
    }

    fn infer_if(
        &mut self,
        label: &str,
        cond: Option<DType>,
        then_g: &mut Graph,
        else_g: &mut Graph,
        n_out: usize,
    ) -> Result<NodeOut, IrError> {
        if let Some(d) = cond {
            if d != DType::Bool {
                return Err(lerr(label, format!("the condition is {d}, expected bool")));
            }
        }
        let w1 = self.sub_infer(then_g, label, "then branch")?;
        let w2 = self.sub_infer(else_g, label, "else branch")?;
        self.warnings.extend(w1);
        self.warnings.extend(w2);
        if then_g.outputs.len() != else_g.outputs.len() {
            return Err(lerr(
                label,
                format!(
                    "the then branch has {} outputs but the else branch has {}",
                    then_g.outputs.len(),
                    else_g.outputs.len()
                ),
            ));
        }
        if n_out > then_g.outputs.len() {
            return Err(lerr(
                label,
                format!(
                    "the node has {n_out} outputs but its branches have {}",
                    then_g.outputs.len()
                ),
            ));
        }
        let mut types = Vec::with_capacity(n_out);
        for (i, (a, b)) in then_g
            .outputs
            .iter()
            .zip(&else_g.outputs)
            .enumerate()
            .take(n_out)
        {
            let Some(t) = join_types(&a.ty, &b.ty) else {
                return Err(lerr(
                    label,
                    format!(
                        "output {i} is {} in the then branch but {} in the else branch",
                        a.ty.describe(),
                        b.ty.describe()
                    ),
                ));
            };
            types.push(Some(t));
        }
        Ok(NodeOut::many(types))
    }

    fn infer_loop(
        &mut self,
        label: &str,
        ins: &[Option<ValueType>],
        trip: Option<i64>,
        body: &mut Graph,
        n_out: usize,
    ) -> Result<NodeOut, IrError> {
        let n_carried = ins.len().saturating_sub(2);
        if body.inputs.len() != n_carried + 2 || body.outputs.len() < n_carried + 1 {
            return Err(lerr(
                label,
                format!(
                    "the body has {} inputs and {} outputs, but the node carries {n_carried} values \
                     (the body needs {} inputs and at least {} outputs)",
                    body.inputs.len(),
                    body.outputs.len(),
                    n_carried + 2,
                    n_carried + 1
                ),
            ));
        }
        let n_scan = body.outputs.len() - 1 - n_carried;
        if n_out > n_carried + n_scan {
            return Err(lerr(
                label,
                format!(
                    "the node has {n_out} outputs but the body gives {} values",
                    n_carried + n_scan
                ),
            ));
        }
        let mut carried: Vec<ValueType> = Vec::with_capacity(n_carried);
        for i in 0..n_carried {
            let declared = &body.inputs[2 + i].ty;
            let t = match &ins[2 + i] {
                Some(t) => {
                    if t.dtype != declared.dtype && !is_placeholder(declared) {
                        return Err(lerr(
                            label,
                            format!(
                                "loop-carried value {i} is {} but the body declares {}",
                                t.dtype, declared.dtype
                            ),
                        ));
                    }
                    ValueType {
                        kind: t.kind.clone(),
                        ..vt(
                            t.dtype,
                            t.shape.clone().or_else(|| {
                                if is_placeholder(declared) {
                                    None
                                } else {
                                    declared.shape.clone()
                                }
                            }),
                        )
                    }
                }
                None => declared.clone(),
            };
            carried.push(t);
        }
        if self.depth + 1 >= LOOP_FIXPOINT_DEPTH {
            for c in &mut carried {
                c.shape = None;
            }
        }
        let mut pass = 0;
        let (b, warnings, finals) = loop {
            let mut b = body.clone();
            b.inputs[0].ty = vt(DType::I64, Some(vec![]));
            b.inputs[1].ty = vt(DType::Bool, Some(vec![]));
            for (i, c) in carried.iter().enumerate() {
                b.inputs[2 + i].ty = c.clone();
            }
            let w = self.sub_infer(&mut b, label, "body")?;
            let mut joined = Vec::with_capacity(n_carried);
            for (i, c) in carried.iter().enumerate() {
                let o = &b.outputs[1 + i].ty;
                let Some(j) = join_types(c, o) else {
                    return Err(lerr(
                        label,
                        format!(
                            "loop-carried value {i} enters the body as {} but leaves it as {}",
                            c.describe(),
                            o.describe()
                        ),
                    ));
                };
                joined.push(j);
            }
            if joined == carried || pass >= 2 {
                break (b, w, joined);
            }
            carried = if pass == 0 {
                joined
            } else {
                joined
                    .into_iter()
                    .zip(&carried)
                    .map(|(j, c)| {
                        if j == *c {
                            j
                        } else {
                            ValueType { shape: None, ..j }
                        }
                    })
                    .collect()
            };
            pass += 1;
        };
        self.warnings.extend(warnings);
        let lead = match trip {
            Some(m) => usize::try_from(m).map(Dim::Known).unwrap_or(Dim::Unknown),
            None => Dim::Unknown,
        };
        let mut types: Vec<Option<ValueType>> = finals.into_iter().map(Some).collect();
        for k in 0..n_scan {
            let t = &b.outputs[1 + n_carried + k].ty;
            let shape = t.shape.as_ref().map(|s| {
                let mut v = Vec::with_capacity(s.len() + 1);
                v.push(lead.clone());
                v.extend_from_slice(s);
                v
            });
            types.push(Some(vt(t.dtype, shape)));
        }
        types.truncate(n_out);
        *body = b;
        Ok(NodeOut::many(types))
    }
}

/// Content after a Cast: integer values stay (floats hold them exactly enough
/// for shape work); casting to bool keeps only plain numbers.
fn cast_content(c: Option<&[Sym]>, from: Option<DType>, to: DType) -> Option<Vec<Sym>> {
    let c = c?;
    if to == DType::String || from == Some(DType::String) {
        return None;
    }
    if to == DType::Bool {
        return c
            .iter()
            .map(|s| match s {
                Sym::Int(v) => Some(Sym::Int((*v != 0) as i64)),
                Sym::Dim(_) => None,
            })
            .collect();
    }
    Some(c.to_vec())
}

fn binary_elem(op: BinaryOp, x: &Sym, y: &Sym, float: bool) -> Option<Sym> {
    let r = match op {
        BinaryOp::Add => sym_arith(x, y, Arith::Add),
        BinaryOp::Sub => sym_arith(x, y, Arith::Sub),
        BinaryOp::Mul => sym_arith(x, y, Arith::Mul),
        BinaryOp::Div => {
            if float {
                sym_div_exact(x, y)?
            } else {
                sym_arith(x, y, Arith::Div)
            }
        }
        BinaryOp::Max | BinaryOp::Min => match (x, y) {
            (Sym::Int(a), Sym::Int(b)) => Sym::Int(if op == BinaryOp::Max {
                *a.max(b)
            } else {
                *a.min(b)
            }),
            (Sym::Dim(d), Sym::Int(v)) | (Sym::Int(v), Sym::Dim(d))
                if !d.is_unknown() && *v <= 0 && op == BinaryOp::Max =>
            {
                Sym::Dim(d.clone())
            }
            (a, b) if a == b && !matches!(a, Sym::Dim(Dim::Unknown)) => a.clone(),
            _ => return None,
        },
        BinaryOp::Equal => match (x, y) {
            (Sym::Int(a), Sym::Int(b)) => Sym::Int((a == b) as i64),
            (Sym::Dim(d), Sym::Int(v)) | (Sym::Int(v), Sym::Dim(d))
                if !d.is_unknown() && *v < 0 =>
            {
                Sym::Int(0)
            }
            (Sym::Dim(a), Sym::Dim(b)) if same_dim(a, b) => Sym::Int(1),
            _ => return None,
        },
        BinaryOp::Less
        | BinaryOp::LessOrEqual
        | BinaryOp::Greater
        | BinaryOp::GreaterOrEqual
        | BinaryOp::And
        | BinaryOp::Or
        | BinaryOp::Xor => match (x, y) {
            (Sym::Int(a), Sym::Int(b)) => Sym::Int(match op {
                BinaryOp::Less => a < b,
                BinaryOp::LessOrEqual => a <= b,
                BinaryOp::Greater => a > b,
                BinaryOp::GreaterOrEqual => a >= b,
                BinaryOp::And => *a != 0 && *b != 0,
                BinaryOp::Or => *a != 0 || *b != 0,
                _ => (*a != 0) != (*b != 0),
            } as i64),
            _ => return None,
        },
        _ => return None,
    };
    match r {
        Sym::Dim(Dim::Unknown) => None,
        other => Some(other),
    }
}

/// A dim from a float count (non-negative, finite, exactly representable).
fn float_dim(v: f64) -> Dim {
    if v.is_finite() && (0.0..9.0e15).contains(&v) {
        Dim::Known(v as usize)
    } else {
        Dim::Unknown
    }
}

/// `floor(d * scale)` as Resize computes it. Symbolic dims only scale by whole
/// factors.
fn scale_dim(d: &Dim, scale: f64, plain: bool) -> Dim {
    if !scale.is_finite() || scale < 0.0 {
        return Dim::Unknown;
    }
    match d.known() {
        Some(x) => float_dim(((x as f32) * (scale as f32)).floor() as f64),
        None if plain && scale.fract() == 0.0 && (1.0..1.0e6).contains(&scale) => {
            darith(d, &Dim::Known(scale as usize), Arith::Mul)
        }
        None => Dim::Unknown,
    }
}

/// Target dims of Reshape from a (symbolic) shape input.
fn reshape_dims(
    data: Option<&[Dim]>,
    target: &[Sym],
    allowzero: bool,
) -> Result<Option<Shape>, String> {
    let tshape = || {
        let parts: Vec<String> = target
            .iter()
            .map(|s| match s {
                Sym::Int(v) => v.to_string(),
                Sym::Dim(d) => d.to_string(),
            })
            .collect();
        format!("[{}]", parts.join(", "))
    };
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, s) in target.iter().enumerate() {
        let d = match s {
            Sym::Int(v) if *v > 0 => usize::try_from(*v).map(Dim::Known).unwrap_or(Dim::Unknown),
            Sym::Int(0) if allowzero => Dim::Known(0),
            Sym::Int(0) => match data {
                Some(ds) => match ds.get(i) {
                    Some(d) => d.clone(),
                    None => {
                        return Err(format!(
                            "shape {} copies dim {i} (a 0) but the input {} has rank {}",
                            tshape(),
                            format_shape(ds),
                            ds.len()
                        ))
                    }
                },
                None => Dim::Unknown,
            },
            Sym::Int(-1) => {
                if infer_at.is_some() {
                    return Err(format!("shape {} has more than one -1", tshape()));
                }
                infer_at = Some(i);
                Dim::Unknown
            }
            Sym::Int(v) => return Err(format!("shape {} has an invalid entry {v}", tshape())),
            Sym::Dim(d) => d.clone(),
        };
        out.push(d);
    }
    let Some(ds) = data else {
        return Ok(Some(out));
    };
    match infer_at {
        Some(j) => {
            let rest: Vec<Dim> = out
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != j)
                .map(|(_, d)| d.clone())
                .collect();
            let total = dprod(ds);
            let rest = dprod(&rest);
            out[j] = match (total.known(), rest.known()) {
                (_, Some(0)) => Dim::Unknown,
                (Some(t), Some(r)) => {
                    if t % r != 0 {
                        return Err(format!(
                            "cannot reshape {} ({t} elements) to {}",
                            format_shape(ds),
                            tshape()
                        ));
                    }
                    Dim::Known(t / r)
                }
                _ => darith(&total, &rest, Arith::Div),
            };
        }
        None => {
            if let (Some(t), Some(r)) = (known_numel(ds), known_numel(&out)) {
                if t != r {
                    return Err(format!(
                        "cannot reshape {} ({t} elements) to {} ({r} elements)",
                        format_shape(ds),
                        tshape()
                    ));
                }
            }
        }
    }
    Ok(Some(out))
}

/// Length of a sliced axis.
fn slice_len(d: &Dim, start: &Sym, end: &Sym, step: i64) -> Dim {
    if step == 0 {
        return Dim::Unknown;
    }
    if let (Some(dk), Sym::Int(s), Sym::Int(e)) = (d.known(), start, end) {
        let n = dk as i128;
        let (mut s, mut e, k) = (*s as i128, *e as i128, step as i128);
        if s < 0 {
            s += n;
        }
        if e < 0 {
            e += n;
        }
        let len = if k > 0 {
            let s = s.max(0).min(n);
            let e = e.max(0).min(n);
            if e > s {
                (e - s + k - 1) / k
            } else {
                0
            }
        } else {
            if n == 0 {
                return Dim::Known(0);
            }
            let s = s.max(0).min(n - 1);
            let e = e.max(-1).min(n - 1);
            if s > e {
                (s - e - k - 1) / (-k)
            } else {
                0
            }
        };
        return usize::try_from(len).map(Dim::Known).unwrap_or(Dim::Unknown);
    }
    let nonneg = |x: &Sym| match x {
        Sym::Int(v) => *v >= 0,
        Sym::Dim(d) => !d.is_unknown(),
    };
    let big = |x: &Sym| matches!(x, Sym::Int(v) if *v >= BIG_END);
    let dsym = sym_of_dim(d);
    let r = if step > 0 {
        if big(end) && nonneg(start) {
            // ceil((d - start) / step)
            let diff = sym_arith(&dsym, start, Arith::Sub);
            let num = sym_arith(&diff, &Sym::Int(step - 1), Arith::Add);
            sym_arith(&num, &Sym::Int(step), Arith::Div)
        } else if step != 1 {
            return Dim::Unknown;
        } else {
            match (start, end) {
                (Sym::Int(s), e) if *s < 0 && big(e) => Sym::Int(s.saturating_neg()),
                (s, Sym::Int(e)) if *e < 0 && nonneg(s) => {
                    let x = sym_arith(&dsym, &Sym::Int(*e), Arith::Add);
                    sym_arith(&x, s, Arith::Sub)
                }
                (s, Sym::Dim(e)) if !e.is_unknown() && nonneg(s) => {
                    sym_arith(&Sym::Dim(e.clone()), s, Arith::Sub)
                }
                _ => return Dim::Unknown,
            }
        }
    } else {
        let from_end = matches!(start, Sym::Int(v) if *v == -1 || *v >= BIG_END);
        let to_begin = matches!(end, Sym::Int(v) if *v <= -BIG_END);
        if from_end && to_begin {
            let k = step.checked_neg().unwrap_or(i64::MAX);
            let num = sym_arith(&dsym, &Sym::Int(k - 1), Arith::Add);
            sym_arith(&num, &Sym::Int(k), Arith::Div)
        } else {
            return Dim::Unknown;
        }
    };
    dim_of_sym(&r)
}

/// Indices a slice picks from a short axis.
fn slice_indices(len: usize, start: i64, end: i64, step: i64) -> Option<Vec<usize>> {
    if step == 0 {
        return None;
    }
    let n = len as i128;
    let (mut s, mut e, k) = (start as i128, end as i128, step as i128);
    if s < 0 {
        s += n;
    }
    if e < 0 {
        e += n;
    }
    let mut out = Vec::new();
    if k > 0 {
        let mut i = s.max(0).min(n);
        let e = e.max(0).min(n);
        while i < e {
            out.push(i as usize);
            i += k;
        }
    } else {
        if n == 0 {
            return Some(out);
        }
        let mut i = s.max(0).min(n - 1);
        let e = e.max(-1).min(n - 1);
        while i > e {
            out.push(i as usize);
            i += k;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Activation, ConvAttrs, CoordTransform, NearestMode, PadMode, ResizeMode, ValueInfo,
        VariadicOp,
    };

    /// `"N,3,224,224"` -> symbolic dims; numbers are known, `?` is unknown.
    fn dims(spec: &str) -> Shape {
        if spec.is_empty() {
            return vec![];
        }
        spec.split(',')
            .map(|p| {
                let p = p.trim();
                if p == "?" {
                    Dim::Unknown
                } else if let Ok(v) = p.parse::<usize>() {
                    Dim::Known(v)
                } else {
                    Dim::named(p)
                }
            })
            .collect()
    }

    fn vi(name: &str, dtype: DType, spec: &str) -> ValueInfo {
        ValueInfo {
            name: name.into(),
            ty: ValueType::new(dtype, Some(dims(spec))),
        }
    }

    /// An output declared without a type (as the frontend writes it).
    fn untyped(name: &str) -> ValueInfo {
        ValueInfo {
            name: name.into(),
            ty: ValueType::new(DType::F32, None),
        }
    }

    fn node(name: &str, op: Op, ins: &[&str], outs: &[&str]) -> Node {
        let opt = |s: &&str| (!s.is_empty()).then(|| s.to_string());
        Node {
            name: name.into(),
            op,
            inputs: ins.iter().map(opt).collect(),
            outputs: outs.iter().map(opt).collect(),
        }
    }

    fn graph(inputs: Vec<ValueInfo>, outputs: &[&str], nodes: Vec<Node>) -> Graph {
        Graph {
            name: "g".into(),
            inputs,
            outputs: outputs.iter().map(|o| untyped(o)).collect(),
            nodes,
            ..Default::default()
        }
    }

    fn init_i64(g: &mut Graph, name: &str, v: Vec<i64>) {
        g.initializers
            .insert(name.into(), Arc::new(Tensor::vector(v)));
    }

    fn init_scalar(g: &mut Graph, name: &str, v: i64) {
        g.initializers
            .insert(name.into(), Arc::new(Tensor::scalar(v)));
    }

    fn init_f32(g: &mut Graph, name: &str, shape: Vec<usize>) {
        let t = Tensor::zeros(DType::F32, shape).unwrap();
        g.initializers.insert(name.into(), Arc::new(t));
    }

    fn run(g: &mut Graph) -> InferReport {
        infer_graph(g, &HashMap::new()).unwrap()
    }

    fn ty(g: &Graph, name: &str) -> ValueType {
        g.value_types
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("no type for '{name}'"))
    }

    fn shape(g: &Graph, name: &str) -> String {
        ty(g, name).shape_string()
    }

    fn conv_op(strides: &[usize], pads: &[usize], auto_pad: AutoPad) -> Op {
        Op::Conv(ConvAttrs {
            auto_pad,
            dilations: vec![],
            group: 1,
            kernel_shape: vec![],
            pads: pads.to_vec(),
            strides: strides.to_vec(),
        })
    }

    fn pool_attrs(k: &[usize], s: &[usize], pads: &[usize], ceil: bool) -> PoolAttrs {
        PoolAttrs {
            auto_pad: AutoPad::NotSet,
            ceil_mode: ceil,
            dilations: vec![],
            kernel_shape: k.to_vec(),
            pads: pads.to_vec(),
            strides: s.to_vec(),
            count_include_pad: false,
        }
    }

    #[test]
    fn conv_and_pool_shapes() {
        let mut g = graph(
            vec![
                vi("x", DType::F32, "N,3,224,224"),
                vi("xs", DType::F32, "N,3,H,W"),
                vi("small", DType::F32, "1,1,4,4"),
                vi("p", DType::F32, "1,1,112,112"),
                vi("d", DType::F32, "1,1,32,32"),
            ],
            &["y"],
            vec![
                node(
                    "conv1",
                    conv_op(&[2, 2], &[3, 3, 3, 3], AutoPad::NotSet),
                    &["x", "w7", "b"],
                    &["c1"],
                ),
                node(
                    "pool1",
                    Op::MaxPool(pool_attrs(&[3, 3], &[2, 2], &[1, 1, 1, 1], false)),
                    &["c1"],
                    &["y", "idx"],
                ),
                node(
                    "same",
                    conv_op(&[2, 2], &[], AutoPad::SameUpper),
                    &["xs", "w3"],
                    &["c2"],
                ),
                node(
                    "keep",
                    conv_op(&[], &[1, 1, 1, 1], AutoPad::NotSet),
                    &["xs", "w3"],
                    &["c3"],
                ),
                node(
                    "valid",
                    conv_op(&[], &[], AutoPad::Valid),
                    &["xs", "w3"],
                    &["c4"],
                ),
                node(
                    "ceil",
                    Op::AveragePool(pool_attrs(&[3, 3], &[2, 2], &[], true)),
                    &["p"],
                    &["a1"],
                ),
                node(
                    "floor",
                    Op::AveragePool(pool_attrs(&[3, 3], &[2, 2], &[], false)),
                    &["p"],
                    &["a2"],
                ),
                node(
                    "ceil_drop",
                    Op::MaxPool(pool_attrs(&[2, 2], &[2, 2], &[0, 0, 1, 1], true)),
                    &["small"],
                    &["a3"],
                ),
                node(
                    "ceil_sym",
                    Op::MaxPool(pool_attrs(&[3, 3], &[2, 2], &[], true)),
                    &["xs"],
                    &["a4"],
                ),
                node(
                    "dilated",
                    Op::Conv(ConvAttrs {
                        auto_pad: AutoPad::NotSet,
                        dilations: vec![2, 2],
                        group: 1,
                        kernel_shape: vec![3, 3],
                        pads: vec![],
                        strides: vec![],
                    }),
                    &["d", "w1"],
                    &["c5"],
                ),
                node("gap", Op::GlobalAveragePool, &["c1"], &["g1"]),
            ],
        );
        init_f32(&mut g, "w7", vec![64, 3, 7, 7]);
        init_f32(&mut g, "b", vec![64]);
        init_f32(&mut g, "w3", vec![8, 3, 3, 3]);
        init_f32(&mut g, "w1", vec![4, 1, 3, 3]);
        let report = run(&mut g);
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        assert_eq!(shape(&g, "c1"), "[N, 64, 112, 112]");
        assert_eq!(shape(&g, "y"), "[N, 64, 56, 56]");
        assert_eq!(ty(&g, "idx").dtype, DType::I64);
        assert_eq!(shape(&g, "idx"), "[N, 64, 56, 56]");
        assert_eq!(shape(&g, "c2"), "[N, 8, (H+1)/2, (W+1)/2]");
        assert_eq!(shape(&g, "c3"), "[N, 8, H, W]");
        assert_eq!(shape(&g, "c4"), "[N, 8, (H-2), (W-2)]");
        assert_eq!(shape(&g, "a1"), "[1, 1, 56, 56]");
        assert_eq!(shape(&g, "a2"), "[1, 1, 55, 55]");
        // ceil_mode drops the last window when it would start in the end padding.
        assert_eq!(shape(&g, "a3"), "[1, 1, 2, 2]");
        assert_eq!(shape(&g, "a4"), "[N, 3, ((H-2)/2+1), ((W-2)/2+1)]");
        assert_eq!(shape(&g, "c5"), "[1, 4, 28, 28]");
        assert_eq!(shape(&g, "g1"), "[N, 64, 1, 1]");
        // The graph output gets the inferred type.
        assert_eq!(g.outputs[0].ty, ty(&g, "y"));
    }

    #[test]
    fn conv_errors_on_channel_mismatch_and_small_input() {
        let mut g = graph(
            vec![vi("x", DType::F32, "1,4,8,8")],
            &["y"],
            vec![node(
                "conv1",
                conv_op(&[], &[], AutoPad::NotSet),
                &["x", "w"],
                &["y"],
            )],
        );
        init_f32(&mut g, "w", vec![8, 3, 3, 3]);
        let e = infer_graph(&mut g, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("node 'conv1' (Conv)")
                && e.contains("4 channels")
                && e.contains("[8, 3, 3, 3]"),
            "{e}"
        );

        let mut g = graph(
            vec![vi("x", DType::F32, "1,3,2,2")],
            &["y"],
            vec![node(
                "conv1",
                conv_op(&[], &[], AutoPad::NotSet),
                &["x", "w"],
                &["y"],
            )],
        );
        init_f32(&mut g, "w", vec![8, 3, 3, 3]);
        let e = infer_graph(&mut g, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("'conv1'") && e.contains("larger"), "{e}");
    }

    #[test]
    fn conv_transpose_and_group_conv() {
        let mut g = graph(
            vec![
                vi("x", DType::F32, "N,16,H,10"),
                vi("z", DType::F32, "N,32,8,8"),
            ],
            &["y", "dw"],
            vec![
                node(
                    "up",
                    Op::ConvTranspose(ConvTransposeAttrs {
                        conv: ConvAttrs {
                            auto_pad: AutoPad::NotSet,
                            dilations: vec![],
                            group: 1,
                            kernel_shape: vec![],
                            pads: vec![1, 1, 1, 1],
                            strides: vec![2, 2],
                        },
                        output_padding: vec![1, 1],
                        output_shape: vec![],
                    }),
                    &["x", "wt"],
                    &["y"],
                ),
                node(
                    "dw",
                    Op::Conv(ConvAttrs {
                        auto_pad: AutoPad::NotSet,
                        dilations: vec![],
                        group: 32,
                        kernel_shape: vec![],
                        pads: vec![1, 1, 1, 1],
                        strides: vec![],
                    }),
                    &["z", "wd"],
                    &["dw"],
                ),
            ],
        );
        init_f32(&mut g, "wt", vec![16, 4, 3, 3]);
        init_f32(&mut g, "wd", vec![32, 1, 3, 3]);
        run(&mut g);
        // (in-1)*2 + 1 + 3 - 2 = 2*in
        assert_eq!(shape(&g, "y"), "[N, 4, H*2, 20]");
        assert_eq!(shape(&g, "dw"), "[N, 32, 8, 8]");
    }

    #[test]
    fn matmul_broadcasts_batches_and_promotes_vectors() {
        let mut g = graph(
            vec![
                vi("a", DType::F32, "B,1,S,64"),
                vi("b", DType::F32, "12,64,T"),
                vi("v", DType::F32, "64"),
                vi("m", DType::F32, "B,64,T"),
                vi("q", DType::F32, "B,S,64"),
            ],
            &["y"],
            vec![
                node("mm", Op::MatMul, &["a", "b"], &["y"]),
                node("vm", Op::MatMul, &["v", "m"], &["y2"]),
                node("mv", Op::MatMul, &["q", "v"], &["y3"]),
                node("vv", Op::MatMul, &["v", "v"], &["y4"]),
            ],
        );
        run(&mut g);
        assert_eq!(shape(&g, "y"), "[B, 12, S, T]");
        assert_eq!(shape(&g, "y2"), "[B, T]");
        assert_eq!(shape(&g, "y3"), "[B, S]");
        assert_eq!(shape(&g, "y4"), "[]");

        let mut g = graph(
            vec![vi("a", DType::F32, "2,3"), vi("b", DType::F32, "4,5")],
            &["y"],
            vec![node("mm", Op::MatMul, &["a", "b"], &["y"])],
        );
        let e = infer_graph(&mut g, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'mm' (MatMul)") && e.contains("[2, 3]") && e.contains("[4, 5]"),
            "{e}"
        );

        let mut g = graph(
            vec![vi("a", DType::F32, "2,3"), vi("b", DType::F16, "3,5")],
            &["y"],
            vec![node("mm", Op::MatMul, &["a", "b"], &["y"])],
        );
        let e = infer_graph(&mut g, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert_eq!(e, "node 'mm' (MatMul): input 1 is f16 but input 0 is f32");
    }

    #[test]
    fn gemm_shapes_and_inner_dim_error() {
        let mut g = graph(
            vec![vi("x", DType::F32, "N,2048")],
            &["y"],
            vec![node(
                "fc",
                Op::Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: true,
                },
                &["x", "w", "b"],
                &["y"],
            )],
        );
        init_f32(&mut g, "w", vec![1000, 2048]);
        init_f32(&mut g, "b", vec![1000]);
        run(&mut g);
        assert_eq!(shape(&g, "y"), "[N, 1000]");

        let mut g = graph(
            vec![vi("x", DType::F32, "N,2048")],
            &["y"],
            vec![node(
                "fc",
                Op::Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: false,
                },
                &["x", "w"],
                &["y"],
            )],
        );
        init_f32(&mut g, "w", vec![1000, 2048]);
        let e = infer_graph(&mut g, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("'fc' (Gemm)") && e.contains("inner dims"), "{e}");
    }

    /// BERT-style head split: the target shape is computed at run time.
    #[test]
    fn bert_reshape_chain_keeps_symbolic_dims() {
        let mut g = graph(
            vec![vi("x", DType::F32, "B,S,768")],
            &["t"],
            vec![
                node(
                    "shape",
                    Op::Shape {
                        start: 0,
                        end: None,
                    },
                    &["x"],
                    &["s"],
                ),
                node("g0", Op::Gather { axis: 0 }, &["s", "i0"], &["b"]),
                node("g1", Op::Gather { axis: 0 }, &["s", "i1"], &["sl"]),
                node("u0", Op::Unsqueeze, &["b", "ax0"], &["bu"]),
                node("u1", Op::Unsqueeze, &["sl", "ax0"], &["su"]),
                node(
                    "cat",
                    Op::Concat { axis: 0 },
                    &["bu", "su", "heads"],
                    &["target"],
                ),
                node(
                    "reshape",
                    Op::Reshape { allowzero: false },
                    &["x", "target"],
                    &["r"],
                ),
                node(
                    "transpose",
                    Op::Transpose {
                        perm: Some(vec![0, 2, 1, 3]),
                    },
                    &["r"],
                    &["t"],
                ),
            ],
        );
        init_scalar(&mut g, "i0", 0);
        init_scalar(&mut g, "i1", 1);
        init_i64(&mut g, "ax0", vec![0]);
        init_i64(&mut g, "heads", vec![12, 64]);
        let (report, values) =
            infer_graph_with_values(&mut g, &HashMap::new(), &HashMap::new()).unwrap();
        assert!(report.warnings.is_empty());
        assert_eq!(shape(&g, "s"), "[3]");
        assert_eq!(ty(&g, "s").dtype, DType::I64);
        assert_eq!(shape(&g, "b"), "[]");
        assert_eq!(shape(&g, "target"), "[4]");
        assert_eq!(values["s"], dims("B,S,768"));
        assert_eq!(values["target"], dims("B,S,12,64"));
        assert_eq!(shape(&g, "r"), "[B, S, 12, 64]");
        assert_eq!(shape(&g, "t"), "[B, 12, S, 64]");
        assert_eq!(g.outputs[0].ty.shape, Some(dims("B,12,S,64")));
        assert_eq!(g.outputs[0].ty.dtype, DType::F32);
    }

    #[test]
    fn reshape_minus_one_gives_symbolic_quotient() {
        let mut g = graph(
            vec![
                vi("x", DType::F32, "B,S,768"),
                vi("y", DType::F32, "N,10"),
                vi("h", DType::F32, "B,S,12,64"),
            ],
            &["r1"],
            vec![
                node(
                    "r1",
                    Op::Reshape { allowzero: false },
                    &["x", "t1"],
                    &["r1"],
                ),
                node(
                    "r2",
                    Op::Reshape { allowzero: false },
                    &["x", "t2"],
                    &["r2"],
                ),
                node(
                    "r3",
                    Op::Reshape { allowzero: false },
                    &["y", "t3"],
                    &["r3"],
                ),
                node(
                    "r4",
                    Op::Reshape { allowzero: false },
                    &["h", "t4"],
                    &["r4"],
                ),
                node("flat", Op::Flatten { axis: 1 }, &["h"], &["f"]),
                node(
                    "back",
                    Op::Reshape { allowzero: false },
                    &["f", "t5"],
                    &["r5"],
                ),
            ],
        );
        init_i64(&mut g, "t1", vec![-1, 768]);
        init_i64(&mut g, "t2", vec![0, -1, 64]);
        init_i64(&mut g, "t3", vec![-1, 4]);
        init_i64(&mut g, "t4", vec![0, 0, -1]);
        init_i64(&mut g, "t5", vec![0, -1, 768]);
        run(&mut g);
        assert_eq!(shape(&g, "r1"), "[B*S, 768]");
        assert_eq!(shape(&g, "r2"), "[B, S*12, 64]");
        assert_eq!(shape(&g, "r3"), "[N*10/4, 4]");
        assert_eq!(shape(&g, "r4"), "[B, S, 768]");
        assert_eq!(shape(&g, "f"), "[B, S*768]");
        assert_eq!(shape(&g, "r5"), "[B, S, 768]");

        let mut g = graph(
            vec![vi("x", DType::F32, "2,3")],
            &["r"],
            vec![node(
                "rs",
                Op::Reshape { allowzero: false },
                &["x", "t"],
                &["r"],
            )],
        );
        init_i64(&mut g, "t", vec![4, -1]);
        let e = infer_graph(&mut g, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'rs' (Reshape)") && e.contains("6 elements"),
            "{e}"
        );
    }

    #[test]
    fn dtype_clash_names_node_op_and_types() {
        let mut g = graph(
            vec![vi("a", DType::F32, "N,4"), vi("b", DType::I64, "4")],
            &["c"],
            vec![node(
                "add_3",
                Op::Binary(BinaryOp::Add),
                &["a", "b"],
                &["c"],
            )],
        );
        let e = infer_graph(&mut g, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert_eq!(e, "node 'add_3' (Add): input 1 is i64 but input 0 is f32");

        for (op, ins) in [
            (Op::Concat { axis: 0 }, ["a", "b", ""]),
            (Op::Where, ["c", "a", "b"]),
        ] {
            let mut g = graph(
                vec![
                    vi("a", DType::F32, "4"),
                    vi("b", DType::I32, "4"),
                    vi("c", DType::Bool, "4"),
                ],
                &["y"],
                vec![node("n1", op, &ins, &["y"])],
            );
            let e = infer_graph(&mut g, &HashMap::new())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("'n1'") && e.contains("i32") && e.contains("f32"),
                "{e}"
            );
        }

        // Broadcast clash on known dims.
        let mut g = graph(
            vec![vi("a", DType::F32, "2,3"), vi("b", DType::F32, "4,3")],
            &["c"],
            vec![node("mul", Op::Binary(BinaryOp::Mul), &["a", "b"], &["c"])],
        );
        let e = infer_graph(&mut g, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("'mul' (Mul)") && e.contains("broadcast"), "{e}");

        // Pow may mix types; unknown types are never an error.
        let mut g = graph(
            vec![vi("a", DType::F32, "2,3"), vi("b", DType::I64, "")],
            &["c", "d"],
            vec![
                node("pow", Op::Binary(BinaryOp::Pow), &["a", "b"], &["c"]),
                node("add", Op::Binary(BinaryOp::Add), &["a", "nowhere"], &["d"]),
            ],
        );
        let mut outer = HashMap::new();
        outer.insert("unused".to_string(), ValueType::new(DType::F32, None));
        g.inputs.push(ValueInfo {
            name: "nowhere".into(),
            ty: ValueType::new(DType::F32, None),
        });
        infer_graph(&mut g, &outer).unwrap();
        assert_eq!(shape(&g, "c"), "[2, 3]");
        assert_eq!(ty(&g, "d").shape, None);
    }

    #[test]
    fn declared_shapes_are_corrected_with_a_warning() {
        let mut g = graph(
            vec![vi("x", DType::F32, "N,2048")],
            &["logits", "other"],
            vec![
                node(
                    "fc",
                    Op::Gemm {
                        alpha: 1.0,
                        beta: 1.0,
                        trans_a: false,
                        trans_b: true,
                    },
                    &["x", "w", "b"],
                    &["logits"],
                ),
                node(
                    "shape_src",
                    Op::Shape {
                        start: 0,
                        end: None,
                    },
                    &["x"],
                    &["s"],
                ),
                node("neg", Op::Unary(UnaryOp::Neg), &["s"], &["ns"]),
                node(
                    "reshape",
                    Op::Reshape { allowzero: false },
                    &["x", "dyn"],
                    &["other"],
                ),
                node("relu", Op::Unary(UnaryOp::Relu), &["x"], &["mid"]),
            ],
        );
        init_f32(&mut g, "w", vec![1000, 2048]);
        init_f32(&mut g, "b", vec![1000]);
        g.inputs.push(ValueInfo {
            name: "dyn".into(),
            ty: ValueType::new(DType::I64, Some(dims("2"))),
        });
        g.outputs[0].ty = ValueType::new(DType::F32, Some(dims("1,1000")));
        g.outputs[1].ty = ValueType::new(DType::F32, Some(dims("batch,7")));
        g.value_types.insert(
            "mid".into(),
            ValueType::new(DType::F32, Some(dims("?,2048"))),
        );
        let report = run(&mut g);
        assert_eq!(
            report.warnings,
            vec![
                "output 'logits' is declared [1, 1000] but inference gives [N, 1000]; \
                  using the inferred shape"
                    .to_string()
            ]
        );
        assert_eq!(g.outputs[0].ty.shape, Some(dims("N,1000")));
        // Declared dims fill what inference leaves unknown.
        assert_eq!(g.outputs[1].ty.shape, Some(dims("batch,7")));
        assert_eq!(shape(&g, "mid"), "[N, 2048]");

        // A declared dtype that disagrees is an error.
        let mut g = graph(
            vec![vi("x", DType::F32, "N,4")],
            &["y"],
            vec![node("relu", Op::Unary(UnaryOp::Relu), &["x"], &["y"])],
        );
        g.outputs[0].ty = ValueType::new(DType::F16, Some(dims("N,4")));
        let e = infer_graph(&mut g, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'relu'") && e.contains("'y'") && e.contains("f16") && e.contains("f32"),
            "{e}"
        );
    }

    fn branch(name: &str, src: &str, out: &str) -> Graph {
        Graph {
            name: name.into(),
            outputs: vec![untyped(out)],
            nodes: vec![node(&format!("{name}_id"), Op::Identity, &[src], &[out])],
            ..Default::default()
        }
    }

    #[test]
    fn if_merges_branch_types() {
        let mut g = graph(
            vec![
                vi("c", DType::Bool, ""),
                vi("a", DType::F32, "N,3"),
                vi("b", DType::F32, "N,4"),
                vi("i", DType::I64, "N,3"),
            ],
            &["y"],
            vec![node(
                "if1",
                Op::If {
                    then_branch: Box::new(branch("then", "a", "ta")),
                    else_branch: Box::new(branch("else", "b", "eb")),
                },
                &["c"],
                &["y"],
            )],
        );
        run(&mut g);
        assert_eq!(shape(&g, "y"), "[N, ?]");
        assert_eq!(ty(&g, "y").dtype, DType::F32);
        let Op::If { then_branch, .. } = &g.nodes[0].op else {
            unreachable!()
        };
        assert_eq!(then_branch.outputs[0].ty.shape, Some(dims("N,3")));

        let mut g = graph(
            vec![
                vi("c", DType::Bool, ""),
                vi("a", DType::F32, "N,3"),
                vi("i", DType::I64, "N,3"),
            ],
            &["y"],
            vec![node(
                "if1",
                Op::If {
                    then_branch: Box::new(branch("then", "a", "ta")),
                    else_branch: Box::new(branch("else", "i", "eb")),
                },
                &["c"],
                &["y"],
            )],
        );
        let e = infer_graph(&mut g, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'if1' (If)") && e.contains("f32") && e.contains("i64"),
            "{e}"
        );
    }

    #[test]
    fn loop_carried_and_scan_types() {
        // body(iter, cond, v, acc) -> (cond, v + one, concat(acc, v), v)
        let body = Graph {
            name: "body".into(),
            inputs: vec![untyped("it"), untyped("cin"), untyped("v"), untyped("acc")],
            outputs: vec![
                untyped("cout"),
                untyped("v2"),
                untyped("acc2"),
                untyped("scan"),
            ],
            nodes: vec![
                node("cid", Op::Identity, &["cin"], &["cout"]),
                node("inc", Op::Binary(BinaryOp::Add), &["v", "one"], &["v2"]),
                node("grow", Op::Concat { axis: 0 }, &["acc", "v"], &["acc2"]),
                node("sid", Op::Identity, &["v"], &["scan"]),
            ],
            ..Default::default()
        };
        let mut g = graph(
            vec![vi("v0", DType::F32, "N,4"), vi("acc0", DType::F32, "0,4")],
            &["vf", "accf", "scans"],
            vec![node(
                "loop",
                Op::Loop {
                    body: Box::new(body),
                },
                &["trip", "", "v0", "acc0"],
                &["vf", "accf", "scans"],
            )],
        );
        init_scalar(&mut g, "trip", 5);
        init_f32(&mut g, "one", vec![1]);
        run(&mut g);
        assert_eq!(shape(&g, "vf"), "[N, 4]");
        assert_eq!(shape(&g, "accf"), "[?, 4]");
        assert_eq!(shape(&g, "scans"), "[5, N, 4]");
        let Op::Loop { body } = &g.nodes[0].op else {
            unreachable!()
        };
        assert_eq!(body.inputs[0].ty, ValueType::new(DType::I64, Some(vec![])));
        assert_eq!(body.inputs[3].ty.shape, Some(dims("?,4")));
        assert_eq!(body.value_types["acc2"].shape, Some(dims("?,4")));
        // Inference again over its own results changes nothing.
        let before = g.clone();
        let again = run(&mut g);
        assert!(again.warnings.is_empty(), "{:?}", again.warnings);
        assert_eq!(g, before);
    }

    /// GPT-2 style: past length and sequence length from shapes, Range over
    /// them, Slice of a constant mask between them, Expand to a runtime shape.
    #[test]
    fn runtime_shape_arithmetic() {
        let mut g = graph(
            vec![
                vi("x", DType::F32, "B,S,768"),
                vi("past", DType::F32, "B,12,P,64"),
            ],
            &["pos"],
            vec![
                node(
                    "sx",
                    Op::Shape {
                        start: 0,
                        end: None,
                    },
                    &["x"],
                    &["shx"],
                ),
                node(
                    "sp",
                    Op::Shape {
                        start: 2,
                        end: Some(3),
                    },
                    &["past"],
                    &["shp"],
                ),
                node("gs", Op::Gather { axis: 0 }, &["shx", "i1"], &["s"]),
                node("sq", Op::Squeeze, &["shp", "ax0"], &["p"]),
                node("tot", Op::Binary(BinaryOp::Add), &["p", "s"], &["total"]),
                node("range", Op::Range, &["p", "total", "one"], &["pos"]),
                node("us", Op::Unsqueeze, &["p", "ax0"], &["pu"]),
                node("ut", Op::Unsqueeze, &["total", "ax0"], &["tu"]),
                node("slice", Op::Slice, &["mask", "pu", "tu", "ax2", ""], &["m"]),
                node(
                    "slice_tail",
                    Op::Slice,
                    &["x", "neg1", "big", "ax1", ""],
                    &["last"],
                ),
                node("cat", Op::Concat { axis: 0 }, &["shx", "neg1"], &["tgt"]),
                node(
                    "eq",
                    Op::Binary(BinaryOp::Equal),
                    &["tgt", "neg1"],
                    &["isneg"],
                ),
                node("wh", Op::Where, &["isneg", "ones", "tgt"], &["tgt2"]),
                node("cs", Op::Cast { to: DType::I64 }, &["tgt2"], &["tgt3"]),
                node("exp", Op::Expand, &["bias", "shx"], &["eb"]),
                node(
                    "cos",
                    Op::ConstantOfShape {
                        value: Tensor::scalar(1i64),
                    },
                    &["shx"],
                    &["filled"],
                ),
                node("tile", Op::Tile, &["x", "reps"], &["tiled"]),
                node("mul", Op::Binary(BinaryOp::Mul), &["s", "two"], &["s2"]),
                node("div", Op::Binary(BinaryOp::Div), &["s2", "two"], &["s3"]),
                node("us3", Op::Unsqueeze, &["s3", "ax0"], &["s3u"]),
                node("cat2", Op::Concat { axis: 0 }, &["s3u", "c768"], &["tg"]),
                node(
                    "rs",
                    Op::Reshape { allowzero: false },
                    &["x", "tg"],
                    &["flat"],
                ),
            ],
        );
        init_scalar(&mut g, "i1", 1);
        init_scalar(&mut g, "one", 1);
        init_scalar(&mut g, "two", 2);
        init_i64(&mut g, "ax0", vec![0]);
        init_i64(&mut g, "ax1", vec![1]);
        init_i64(&mut g, "ax2", vec![2]);
        init_i64(&mut g, "neg1", vec![-1]);
        init_i64(&mut g, "big", vec![i64::MAX]);
        init_i64(&mut g, "ones", vec![1, 1, 1, 1]);
        init_i64(&mut g, "reps", vec![2, 1, 1]);
        init_i64(&mut g, "c768", vec![-1, 768]);
        init_f32(&mut g, "mask", vec![1, 1, 16, 16]);
        init_f32(&mut g, "bias", vec![768]);
        let (_, values) =
            infer_graph_with_values(&mut g, &HashMap::new(), &HashMap::new()).unwrap();
        assert_eq!(shape(&g, "p"), "[]");
        assert_eq!(values["total"], vec![Dim::named("P").add(&Dim::named("S"))]);
        assert_eq!(shape(&g, "pos"), "[S]");
        assert_eq!(ty(&g, "pos").dtype, DType::I64);
        assert_eq!(shape(&g, "m"), "[1, 1, S, 16]");
        assert_eq!(shape(&g, "last"), "[B, 1, 768]");
        assert_eq!(values["isneg"], dims("0,0,0,1"));
        assert_eq!(values["tgt3"], dims("B,S,768,1"));
        assert_eq!(shape(&g, "eb"), "[B, S, 768]");
        assert_eq!(shape(&g, "filled"), "[B, S, 768]");
        assert_eq!(ty(&g, "filled").dtype, DType::I64);
        assert_eq!(shape(&g, "tiled"), "[B*2, S, 768]");
        assert_eq!(values["s3"], dims("S"));
        // [S, -1, 768] on [B, S, 768]: B*S*768 / (S*768) = B.
        assert_eq!(shape(&g, "flat"), "[S, B, 768]");
    }

    #[test]
    fn output_dtypes_of_special_ops() {
        let mut g = graph(
            vec![vi("x", DType::F32, "N,5"), vi("k", DType::I32, "N,5")],
            &["c"],
            vec![
                node("c", Op::Cast { to: DType::F16 }, &["x"], &["c"]),
                node("cl", Op::CastLike, &["x", "k"], &["cl"]),
                node("lt", Op::Binary(BinaryOp::Less), &["x", "x"], &["lt"]),
                node("and", Op::Binary(BinaryOp::And), &["lt", "lt"], &["and"]),
                node("not", Op::Unary(UnaryOp::Not), &["and"], &["not"]),
                node("nan", Op::Unary(UnaryOp::IsNaN), &["x"], &["nan"]),
                node(
                    "am",
                    Op::ArgMax {
                        axis: -1,
                        keepdims: false,
                        select_last_index: false,
                    },
                    &["x"],
                    &["am"],
                ),
                node(
                    "amk",
                    Op::ArgMin {
                        axis: 0,
                        keepdims: true,
                        select_last_index: false,
                    },
                    &["x"],
                    &["amk"],
                ),
                node("size", Op::Size, &["x"], &["size"]),
                node("drop", Op::Dropout, &["x"], &["d", "mask"]),
                node(
                    "cos",
                    Op::ConstantOfShape {
                        value: Tensor::scalar(0i32),
                    },
                    &["shp"],
                    &["cos"],
                ),
                node(
                    "sum",
                    Op::Variadic(VariadicOp::Sum),
                    &["x", "x", "x"],
                    &["sum"],
                ),
                node("clip", Op::Clip, &["x", "", ""], &["clip"]),
                node(
                    "sm",
                    Op::Softmax {
                        axis: -1,
                        coerce_2d: false,
                    },
                    &["x"],
                    &["sm"],
                ),
            ],
        );
        init_i64(&mut g, "shp", vec![2, 3]);
        run(&mut g);
        let check = |name: &str, dt: DType, s: &str| {
            assert_eq!(ty(&g, name).dtype, dt, "{name}");
            assert_eq!(shape(&g, name), s, "{name}");
        };
        check("c", DType::F16, "[N, 5]");
        check("cl", DType::I32, "[N, 5]");
        check("lt", DType::Bool, "[N, 5]");
        check("and", DType::Bool, "[N, 5]");
        check("not", DType::Bool, "[N, 5]");
        check("nan", DType::Bool, "[N, 5]");
        check("am", DType::I64, "[N]");
        check("amk", DType::I64, "[1, 5]");
        check("size", DType::I64, "[]");
        check("d", DType::F32, "[N, 5]");
        check("mask", DType::Bool, "[N, 5]");
        check("cos", DType::I32, "[2, 3]");
        check("sum", DType::F32, "[N, 5]");
        check("clip", DType::F32, "[N, 5]");
        check("sm", DType::F32, "[N, 5]");
    }

    #[test]
    fn layout_ops_with_constant_parameters() {
        let mut g = graph(
            vec![
                vi("x", DType::F32, "N,3,H,W"),
                vi("e", DType::I64, "N,7"),
                vi("tab", DType::F32, "1000,64"),
            ],
            &["y"],
            vec![
                node(
                    "pad",
                    Op::Pad {
                        mode: PadMode::Constant,
                    },
                    &["x", "pads"],
                    &["y"],
                ),
                node(
                    "split",
                    Op::Split {
                        axis: 1,
                        num_outputs: 0,
                    },
                    &["x", "sizes"],
                    &["s1", "s2"],
                ),
                node(
                    "split_eq",
                    Op::Split {
                        axis: 2,
                        num_outputs: 2,
                    },
                    &["pd", ""],
                    &["h1", "h2"],
                ),
                node(
                    "pad2",
                    Op::Pad {
                        mode: PadMode::Edge,
                    },
                    &["x", "pads2", "", "ax23"],
                    &["pd"],
                ),
                node("gather", Op::Gather { axis: 0 }, &["tab", "e"], &["emb"]),
                node(
                    "sum",
                    Op::Reduce {
                        op: ReduceOp::Mean,
                        keepdims: true,
                        noop_with_empty_axes: false,
                    },
                    &["x", "ax23"],
                    &["mean"],
                ),
                node(
                    "sumall",
                    Op::Reduce {
                        op: ReduceOp::Sum,
                        keepdims: false,
                        noop_with_empty_axes: false,
                    },
                    &["x", ""],
                    &["total"],
                ),
                node("sq", Op::Squeeze, &["mean", "ax23"], &["sqz"]),
                node("cat", Op::Concat { axis: 1 }, &["x", "x", "sqz4"], &["cat"]),
                node("unsq", Op::Unsqueeze, &["sqz", "axneg"], &["sqz4"]),
                node(
                    "slice",
                    Op::Slice,
                    &["x", "st", "en", "ax23", "steps"],
                    &["sl"],
                ),
                node(
                    "resize",
                    Op::Resize(ResizeAttrs {
                        mode: ResizeMode::Nearest,
                        coord: CoordTransform::Asymmetric,
                        nearest: NearestMode::Floor,
                        cubic_coeff_a: -0.75,
                        exclude_outside: false,
                        extrapolation_value: 0.0,
                        antialias: false,
                        axes: vec![],
                        keep_aspect_ratio: KeepAspect::Stretch,
                    }),
                    &["x", "", "scales", ""],
                    &["up"],
                ),
                node(
                    "resize_sz",
                    Op::Resize(ResizeAttrs {
                        mode: ResizeMode::Linear,
                        coord: CoordTransform::HalfPixel,
                        nearest: NearestMode::Floor,
                        cubic_coeff_a: -0.75,
                        exclude_outside: false,
                        extrapolation_value: 0.0,
                        antialias: false,
                        axes: vec![2, 3],
                        keep_aspect_ratio: KeepAspect::Stretch,
                    }),
                    &["x", "", "", "hw"],
                    &["fixed"],
                ),
            ],
        );
        init_i64(&mut g, "pads", vec![0, 0, 1, 2, 0, 0, 3, 4]);
        init_i64(&mut g, "pads2", vec![1, 1, 1, 1]);
        init_i64(&mut g, "sizes", vec![1, 2]);
        init_i64(&mut g, "ax23", vec![2, 3]);
        init_i64(&mut g, "axneg", vec![-1, -2]);
        init_i64(&mut g, "st", vec![1, 0]);
        init_i64(&mut g, "en", vec![-1, i64::MAX]);
        init_i64(&mut g, "steps", vec![1, 2]);
        init_i64(&mut g, "hw", vec![64, 48]);
        g.initializers.insert(
            "scales".into(),
            Arc::new(Tensor::vector(vec![1.0f32, 1.0, 2.0, 2.0])),
        );
        run(&mut g);
        assert_eq!(shape(&g, "y"), "[N, 3, (H+4), (W+6)]");
        assert_eq!(shape(&g, "s1"), "[N, 1, H, W]");
        assert_eq!(shape(&g, "s2"), "[N, 2, H, W]");
        assert_eq!(shape(&g, "pd"), "[N, 3, (H+2), (W+2)]");
        assert_eq!(shape(&g, "h1"), "[N, 3, ?, (W+2)]");
        assert_eq!(shape(&g, "emb"), "[N, 7, 64]");
        assert_eq!(shape(&g, "mean"), "[N, 3, 1, 1]");
        assert_eq!(shape(&g, "total"), "[]");
        assert_eq!(shape(&g, "sqz"), "[N, 3]");
        assert_eq!(shape(&g, "sqz4"), "[N, 3, 1, 1]");
        // H and W must be 1 for the Concat to be valid.
        assert_eq!(shape(&g, "cat"), "[N, 9, 1, 1]");
        assert_eq!(shape(&g, "sl"), "[N, 3, (H-2), (W+1)/2]");
        assert_eq!(shape(&g, "up"), "[N, 3, H*2, W*2]");
        assert_eq!(shape(&g, "fixed"), "[N, 3, 64, 48]");
    }

    #[test]
    fn lstm_output_shapes() {
        let mut g = graph(
            vec![vi("x", DType::F32, "S,B,10")],
            &["y"],
            vec![node(
                "lstm",
                Op::Lstm(LstmAttrs {
                    direction: RnnDirection::Bidirectional,
                    hidden_size: 20,
                    activations: vec![Activation::Sigmoid, Activation::Tanh, Activation::Tanh],
                    clip: None,
                    input_forget: false,
                    layout: 0,
                }),
                &["x", "w", "r"],
                &["y", "yh", "yc"],
            )],
        );
        init_f32(&mut g, "w", vec![2, 80, 10]);
        init_f32(&mut g, "r", vec![2, 80, 20]);
        run(&mut g);
        assert_eq!(shape(&g, "y"), "[S, 2, B, 20]");
        assert_eq!(shape(&g, "yh"), "[2, B, 20]");
        assert_eq!(shape(&g, "yc"), "[2, B, 20]");
    }

    #[test]
    fn concat_sums_axis_and_checks_other_dims() {
        let mut g = graph(
            vec![
                vi("a", DType::F32, "N,S,8"),
                vi("b", DType::F32, "N,T,8"),
                vi("c", DType::F32, "?,4,8"),
            ],
            &["y"],
            vec![node(
                "cat",
                Op::Concat { axis: 1 },
                &["a", "b", "c"],
                &["y"],
            )],
        );
        run(&mut g);
        assert_eq!(shape(&g, "y"), "[N, ((S+T)+4), 8]");

        let mut g = graph(
            vec![vi("a", DType::F32, "N,S,8"), vi("b", DType::F32, "N,T,9")],
            &["y"],
            vec![node("cat", Op::Concat { axis: 1 }, &["a", "b"], &["y"])],
        );
        let e = infer_graph(&mut g, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("'cat' (Concat)") && e.contains("axis 2"), "{e}");
    }

    #[test]
    fn rerun_is_stable_and_untyped_declarations_give_way() {
        let shape_branch = |name: &str, src: &str, out: &str| Graph {
            name: name.into(),
            outputs: vec![untyped(out)],
            nodes: vec![node(
                &format!("{name}_shape"),
                Op::Shape {
                    start: 0,
                    end: None,
                },
                &[src],
                &[out],
            )],
            ..Default::default()
        };
        let mut g = graph(
            vec![
                vi("c", DType::Bool, ""),
                vi("a", DType::F32, "N,3"),
                vi("b", DType::F32, "N,3,5"),
            ],
            &["y", "z"],
            vec![
                node(
                    "if1",
                    Op::If {
                        then_branch: Box::new(shape_branch("then", "a", "sa")),
                        else_branch: Box::new(shape_branch("else", "b", "sb")),
                    },
                    &["c"],
                    &["y"],
                ),
                node("add", Op::Binary(BinaryOp::Add), &["y", "y"], &["z"]),
            ],
        );
        let first = run(&mut g);
        assert!(first.warnings.is_empty(), "{:?}", first.warnings);
        assert_eq!(ty(&g, "y").dtype, DType::I64);
        assert_eq!(shape(&g, "y"), "[?]");
        assert_eq!(g.outputs[1].ty, ValueType::new(DType::I64, Some(dims("?"))));
        let before = g.clone();
        let second = run(&mut g);
        assert!(second.warnings.is_empty(), "{:?}", second.warnings);
        assert_eq!(g, before);
    }

    const HUGE: usize = 1 << 40;

    /// Every op on absurd inputs: it may fail, but it must not panic.
    #[test]
    fn absurd_dims_do_not_panic() {
        let big = format!("{HUGE},{HUGE},{HUGE}");
        let mut g = graph(
            vec![
                vi("x", DType::F32, &big),
                vi(
                    "x4",
                    DType::F32,
                    &format!("{HUGE},{HUGE},{HUGE},{}", usize::MAX),
                ),
            ],
            &["y"],
            vec![
                node(
                    "shape",
                    Op::Shape {
                        start: 0,
                        end: None,
                    },
                    &["x"],
                    &["s"],
                ),
                node("size", Op::Size, &["x4"], &["n"]),
                node("rs", Op::Reshape { allowzero: false }, &["x", "m1"], &["y"]),
                node("fl", Op::Flatten { axis: 2 }, &["x4"], &["f"]),
                node("mm", Op::MatMul, &["x", "x"], &["mm"]),
                node(
                    "cos",
                    Op::ConstantOfShape {
                        value: Tensor::scalar(1f32),
                    },
                    &["s"],
                    &["c"],
                ),
                node("mul", Op::Binary(BinaryOp::Mul), &["s", "s"], &["ss"]),
                node("tile", Op::Tile, &["x", "s"], &["t"]),
                node("exp", Op::Expand, &["x", "s"], &["e"]),
                node("sl", Op::Slice, &["x", "mins", "maxs", "", ""], &["sl"]),
                node(
                    "pool",
                    Op::MaxPool(pool_attrs(&[HUGE], &[HUGE], &[HUGE, HUGE], true)),
                    &["x"],
                    &["p"],
                ),
                node("range", Op::Range, &["lo", "hi", "one"], &["r"]),
                node("us", Op::Unsqueeze, &["x", "mins"], &["u"]),
            ],
        );
        init_i64(&mut g, "m1", vec![-1]);
        init_i64(&mut g, "mins", vec![i64::MIN]);
        init_i64(&mut g, "maxs", vec![i64::MAX]);
        init_scalar(&mut g, "lo", i64::MIN);
        init_scalar(&mut g, "hi", i64::MAX);
        init_scalar(&mut g, "one", 1);
        let _ = infer_graph(&mut g, &HashMap::new());
        // Without the failing nodes the rest infers.
        g.nodes.retain(|n| !matches!(n.op, Op::Unsqueeze));
        let _ = infer_graph(&mut g, &HashMap::new()).unwrap();
        assert_eq!(shape(&g, "y"), "[?]");
        assert_eq!(shape(&g, "f"), "[?, ?]");
        // i64::MIN..i64::MAX holds 2^64 - 1 elements.
        assert_eq!(shape(&g, "r"), format!("[{}]", usize::MAX));
        assert_eq!(shape(&g, "c"), format!("[{HUGE}, {HUGE}, {HUGE}]"));
    }

    /// A tiny deterministic generator of hostile single-op graphs.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn one_in(&mut self, k: u64) -> bool {
            matches!(self.next() % k, 0)
        }
        fn pick<T: Clone>(&mut self, v: &[T]) -> T {
            v[(self.next() as usize) % v.len()].clone()
        }
    }

    fn all_ops(r: &mut Lcg) -> Vec<Op> {
        let u = |r: &mut Lcg| r.pick(&[0usize, 1, 2, 3, HUGE, usize::MAX]);
        let i = |r: &mut Lcg| r.pick(&[-2i64, -1, 0, 1, 2, 3, i64::MIN, i64::MAX]);
        let uv = |r: &mut Lcg| {
            let n = r.pick(&[0usize, 1, 2, 3, 4]);
            (0..n).map(|_| u(r)).collect::<Vec<usize>>()
        };
        let auto = r.pick(&[
            AutoPad::NotSet,
            AutoPad::SameUpper,
            AutoPad::SameLower,
            AutoPad::Valid,
        ]);
        let conv = ConvAttrs {
            auto_pad: auto,
            dilations: uv(r),
            group: u(r),
            kernel_shape: uv(r),
            pads: uv(r),
            strides: uv(r),
        };
        let pool = PoolAttrs {
            auto_pad: auto,
            ceil_mode: r.one_in(2),
            dilations: uv(r),
            kernel_shape: uv(r),
            pads: uv(r),
            strides: uv(r),
            count_include_pad: false,
        };
        let body = Graph {
            name: "b".into(),
            inputs: vec![untyped("it"), untyped("cin"), untyped("v")],
            outputs: vec![untyped("cin"), untyped("v"), untyped("it")],
            ..Default::default()
        };
        vec![
            Op::Unary(UnaryOp::Neg),
            Op::Unary(UnaryOp::Not),
            Op::Binary(BinaryOp::Add),
            Op::Binary(BinaryOp::Div),
            Op::Binary(BinaryOp::Sub),
            Op::Binary(BinaryOp::Mul),
            Op::Binary(BinaryOp::Equal),
            Op::Binary(BinaryOp::Max),
            Op::Variadic(VariadicOp::Sum),
            Op::Clip,
            Op::Where,
            Op::Cast { to: DType::I64 },
            Op::CastLike,
            Op::Identity,
            Op::Dropout,
            Op::Conv(conv.clone()),
            Op::ConvTranspose(ConvTransposeAttrs {
                conv,
                output_padding: uv(r),
                output_shape: uv(r),
            }),
            Op::BatchNormalization { epsilon: 0.0 },
            Op::InstanceNormalization { epsilon: 0.0 },
            Op::LayerNormalization {
                axis: i(r),
                epsilon: 0.0,
            },
            Op::MaxPool(pool.clone()),
            Op::AveragePool(pool),
            Op::GlobalAveragePool,
            Op::Gemm {
                alpha: 1.0,
                beta: 1.0,
                trans_a: r.one_in(2),
                trans_b: true,
            },
            Op::MatMul,
            Op::Softmax {
                axis: i(r),
                coerce_2d: false,
            },
            Op::Resize(ResizeAttrs {
                mode: ResizeMode::Nearest,
                coord: r.pick(&[CoordTransform::TfCropAndResize, CoordTransform::HalfPixel]),
                nearest: NearestMode::Floor,
                cubic_coeff_a: 0.0,
                exclude_outside: false,
                extrapolation_value: 0.0,
                antialias: false,
                axes: (0..r.pick(&[0usize, 1, 2])).map(|_| i(r)).collect(),
                keep_aspect_ratio: r.pick(&[
                    KeepAspect::Stretch,
                    KeepAspect::NotLarger,
                    KeepAspect::NotSmaller,
                ]),
            }),
            Op::Lstm(LstmAttrs {
                direction: RnnDirection::Forward,
                hidden_size: u(r),
                activations: vec![],
                clip: None,
                input_forget: false,
                layout: i(r),
            }),
            Op::Reshape {
                allowzero: r.one_in(2),
            },
            Op::Flatten { axis: i(r) },
            Op::Transpose {
                perm: Some((0..r.pick(&[0usize, 2, 3])).map(|_| i(r)).collect()),
            },
            Op::Transpose { perm: None },
            Op::Squeeze,
            Op::Unsqueeze,
            Op::Concat { axis: i(r) },
            Op::Split {
                axis: i(r),
                num_outputs: u(r) % 5,
            },
            Op::Slice,
            Op::Gather { axis: i(r) },
            Op::GatherElements { axis: i(r) },
            Op::Expand,
            Op::Pad {
                mode: PadMode::Reflect,
            },
            Op::Shape {
                start: i(r),
                end: Some(i(r)),
            },
            Op::Size,
            Op::ConstantOfShape {
                value: Tensor::scalar(3i64),
            },
            Op::Range,
            Op::Tile,
            Op::Trilu { upper: true },
            Op::Reduce {
                op: ReduceOp::Prod,
                keepdims: r.one_in(2),
                noop_with_empty_axes: r.one_in(2),
            },
            Op::ArgMax {
                axis: i(r),
                keepdims: false,
                select_last_index: false,
            },
            Op::If {
                then_branch: Box::new(branch("t", "a", "o")),
                else_branch: Box::new(branch("e", "b", "o2")),
            },
            Op::Loop {
                body: Box::new(body),
            },
        ]
    }

    #[test]
    fn random_hostile_graphs_do_not_panic() {
        let mut r = Lcg(0x5eed);
        let dims_pool = [
            Dim::Known(0),
            Dim::Known(1),
            Dim::Known(2),
            Dim::Known(3),
            Dim::Known(HUGE),
            Dim::Known(usize::MAX),
            Dim::named("N"),
            Dim::Unknown,
        ];
        let dtypes = [DType::F32, DType::I64, DType::Bool, DType::F16, DType::I32];
        let values = [-2i64, -1, 0, 1, 2, 3, 4, i64::MIN, i64::MAX, 1 << 40];
        let mut outcomes = [0usize; 2];
        for round in 0..3000 {
            let ops = all_ops(&mut r);
            let op = ops[round % ops.len()].clone();
            let op2 = r.pick(&ops);
            let mut inputs = Vec::new();
            let mut g = Graph::default();
            let names = ["a", "b", "c", "d", "e"];
            for name in names {
                if r.one_in(3) {
                    let n = r.pick(&[0usize, 1, 2, 3, 4]);
                    let v: Vec<i64> = (0..n).map(|_| r.pick(&values)).collect();
                    if r.one_in(4) && n == 1 {
                        init_scalar(&mut g, name, v[0]);
                    } else {
                        init_i64(&mut g, name, v);
                    }
                } else {
                    let rank = r.pick(&[0usize, 1, 2, 3, 4, 5]);
                    let shape = if r.one_in(8) {
                        None
                    } else {
                        Some((0..rank).map(|_| r.pick(&dims_pool)).collect())
                    };
                    inputs.push(ValueInfo {
                        name: name.into(),
                        ty: ValueType::new(r.pick(&dtypes), shape),
                    });
                }
            }
            let n_in = r.pick(&[1usize, 2, 3, 4, 5]);
            let ins: Vec<&str> = (0..n_in).map(|_| r.pick(&names)).collect();
            let ins2: Vec<&str> = (0..n_in).map(|_| r.pick(&["y0", "y1", "a", "b"])).collect();
            g.inputs = inputs;
            g.nodes = vec![
                node("n0", op, &ins, &["y0", "y1", "y2"]),
                node("n1", op2, &ins2, &["z0", "z1"]),
            ];
            g.outputs = vec![untyped("z0")];
            let ok = infer_graph(&mut g, &HashMap::new()).is_ok();
            outcomes[ok as usize] += 1;
        }
        // Both outcomes happen: the generator reaches real inference.
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    }

    #[test]
    fn sequence_and_optional_kinds_flow_through_loop_and_if() {
        use crate::{SeqOp, ValueKind};
        let seq = |name: &str| ValueInfo {
            name: name.into(),
            ty: ValueType::sequence_of(ValueType::new(DType::F32, None)),
        };
        let opt_seq = |name: &str| ValueInfo {
            name: name.into(),
            ty: ValueType::optional_of(seq(name).ty),
        };
        // Loop: enters as optional(seq), leaves as seq (test_loop16_seq_none).
        let body = Graph {
            name: "body".into(),
            inputs: vec![
                vi("i", DType::I64, ""),
                vi("c", DType::Bool, ""),
                opt_seq("o_in"),
            ],
            outputs: vec![untyped("c_out"), seq("s_out")],
            nodes: vec![
                node("keep", Op::Identity, &["c"], &["c_out"]),
                node(
                    "get",
                    Op::Seq(SeqOp::OptionalGetElement),
                    &["o_in"],
                    &["s_out"],
                ),
            ],
            ..Default::default()
        };
        let then_g = Graph {
            name: "then".into(),
            outputs: vec![untyped("t")],
            nodes: vec![node("id", Op::Identity, &["looped"], &["t"])],
            ..Default::default()
        };
        let else_g = Graph {
            name: "else".into(),
            outputs: vec![untyped("e")],
            nodes: vec![node(
                "empty",
                Op::Seq(SeqOp::SequenceEmpty { dtype: DType::F32 }),
                &[],
                &["e"],
            )],
            ..Default::default()
        };
        let mut g = graph(
            vec![opt_seq("o"), vi("flag", DType::Bool, "")],
            &["looped", "y"],
            vec![
                node(
                    "loop",
                    Op::Loop {
                        body: Box::new(body),
                    },
                    &["m", "", "o"],
                    &["looped"],
                ),
                node(
                    "if",
                    Op::If {
                        then_branch: Box::new(then_g),
                        else_branch: Box::new(else_g),
                    },
                    &["flag"],
                    &["y"],
                ),
            ],
        );
        init_scalar(&mut g, "m", 2);
        g.outputs[0] = seq("looped");
        run(&mut g);
        assert_eq!(g.outputs[0].ty.describe(), "seq(f32 [unknown rank])");
        let y = &g.outputs[1].ty;
        assert_eq!(y.kind, ValueKind::Sequence(Box::new(ValueKind::Tensor)));
        // A tensor declared where a sequence is produced is an error.
        let mut bad = g.clone();
        bad.outputs[1] = vi("y", DType::F32, "2");
        let e = infer_graph(&mut bad, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("'y'") && e.contains("seq("), "{e}");
    }
}
