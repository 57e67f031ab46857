//! Symbolic shapes: dimensions that are known numbers, named symbols ("N", "seq"),
//! or small expressions over them ("S*2", "N/4").

use crate::DType;
use std::collections::HashMap;
use std::fmt;

/// One dimension of a symbolic shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(usize),
    Named(String),
    Expr(Box<DimExpr>),
    /// Not known before run time and not named by the model.
    Unknown,
}

/// Arithmetic over dims, as produced by shape inference (Concat sums, Reshape products).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DimExpr {
    Add(Dim, Dim),
    Sub(Dim, Dim),
    Mul(Dim, Dim),
    /// Floor division.
    Div(Dim, Dim),
}

impl Dim {
    pub fn named(name: impl Into<String>) -> Dim {
        Dim::Named(name.into())
    }

    pub fn known(&self) -> Option<usize> {
        match self {
            Dim::Known(v) => Some(*v),
            _ => None,
        }
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self, Dim::Unknown)
    }

    /// Evaluates the dim with symbols bound by `bindings`.
    pub fn eval(&self, bindings: &HashMap<String, usize>) -> Option<usize> {
        match self {
            Dim::Known(v) => Some(*v),
            Dim::Named(n) => bindings.get(n).copied(),
            Dim::Unknown => None,
            Dim::Expr(e) => match &**e {
                DimExpr::Add(a, b) => a.eval(bindings)?.checked_add(b.eval(bindings)?),
                DimExpr::Sub(a, b) => a.eval(bindings)?.checked_sub(b.eval(bindings)?),
                DimExpr::Mul(a, b) => a.eval(bindings)?.checked_mul(b.eval(bindings)?),
                DimExpr::Div(a, b) => a.eval(bindings)?.checked_div(b.eval(bindings)?),
            },
        }
    }

    fn combine(
        a: &Dim,
        b: &Dim,
        f: fn(usize, usize) -> Option<usize>,
        mk: fn(Dim, Dim) -> DimExpr,
    ) -> Dim {
        match (a, b) {
            (Dim::Known(x), Dim::Known(y)) => f(*x, *y).map(Dim::Known).unwrap_or(Dim::Unknown),
            (Dim::Unknown, _) | (_, Dim::Unknown) => Dim::Unknown,
            _ => Dim::Expr(Box::new(mk(a.clone(), b.clone()))),
        }
    }

    pub fn add(&self, other: &Dim) -> Dim {
        match (self, other) {
            (Dim::Known(0), d) | (d, Dim::Known(0)) => d.clone(),
            _ => Dim::combine(self, other, usize::checked_add, DimExpr::Add),
        }
    }

    pub fn sub(&self, other: &Dim) -> Dim {
        match other {
            Dim::Known(0) => self.clone(),
            _ if self == other => Dim::Known(0),
            _ => Dim::combine(self, other, usize::checked_sub, DimExpr::Sub),
        }
    }

    pub fn mul(&self, other: &Dim) -> Dim {
        match (self, other) {
            (Dim::Known(1), d) | (d, Dim::Known(1)) => d.clone(),
            (Dim::Known(0), _) | (_, Dim::Known(0)) => Dim::Known(0),
            _ => Dim::combine(self, other, usize::checked_mul, DimExpr::Mul),
        }
    }

    pub fn div(&self, other: &Dim) -> Dim {
        match other {
            Dim::Known(1) => self.clone(),
            _ if self == other && !self.is_unknown() => Dim::Known(1),
            _ => Dim::combine(self, other, usize::checked_div, DimExpr::Div),
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(v) => write!(f, "{v}"),
            Dim::Named(n) => write!(f, "{n}"),
            Dim::Unknown => write!(f, "?"),
            Dim::Expr(e) => match &**e {
                DimExpr::Add(a, b) => write!(f, "({a}+{b})"),
                DimExpr::Sub(a, b) => write!(f, "({a}-{b})"),
                DimExpr::Mul(a, b) => write!(f, "{a}*{b}"),
                DimExpr::Div(a, b) => write!(f, "{a}/{b}"),
            },
        }
    }
}

/// A symbolic shape.
pub type Shape = Vec<Dim>;

/// Formats a symbolic shape as `[N, 3, 224, 224]`.
pub fn format_shape(shape: &[Dim]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// Symbolic shape of concrete dims.
pub fn known_shape(dims: &[usize]) -> Shape {
    dims.iter().map(|&d| Dim::Known(d)).collect()
}

/// What a value is: a tensor, or a container (sequence, optional) of values.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum ValueKind {
    #[default]
    Tensor,
    /// A sequence (possibly empty) of values of the inner kind.
    Sequence(Box<ValueKind>),
    /// A value of the inner kind, or none.
    Optional(Box<ValueKind>),
}

impl ValueKind {
    /// Formats a type of this kind around the innermost tensor type `inner`:
    /// `seq(f32[2, 3])`, `optional(seq(i64[?]))`.
    fn wrap(&self, inner: String) -> String {
        match self {
            ValueKind::Tensor => inner,
            ValueKind::Sequence(k) => format!("seq({})", k.wrap(inner)),
            ValueKind::Optional(k) => format!("optional({})", k.wrap(inner)),
        }
    }
}

/// The static type of a value: element type and, when known, its (symbolic) shape.
/// For sequences and optionals (`kind`), `dtype` and `shape` describe the
/// innermost tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueType {
    pub dtype: DType,
    /// `None` when even the rank is unknown.
    pub shape: Option<Shape>,
    /// Tensor (the common case), sequence or optional.
    pub kind: ValueKind,
}

impl ValueType {
    /// A tensor type.
    pub fn new(dtype: DType, shape: Option<Shape>) -> ValueType {
        ValueType {
            dtype,
            shape,
            kind: ValueKind::Tensor,
        }
    }

    /// A sequence whose elements have type `elem`.
    pub fn sequence_of(elem: ValueType) -> ValueType {
        ValueType {
            kind: ValueKind::Sequence(Box::new(elem.kind)),
            ..elem
        }
    }

    /// An optional holding a value of type `inner` (or none).
    pub fn optional_of(inner: ValueType) -> ValueType {
        ValueType {
            kind: ValueKind::Optional(Box::new(inner.kind)),
            ..inner
        }
    }

    pub fn is_tensor(&self) -> bool {
        self.kind == ValueKind::Tensor
    }

    /// The type one level in: a sequence's element, an optional's content; a
    /// tensor type stays as it is.
    pub fn inner(&self) -> ValueType {
        let kind = match &self.kind {
            ValueKind::Tensor => ValueKind::Tensor,
            ValueKind::Sequence(k) | ValueKind::Optional(k) => (**k).clone(),
        };
        ValueType {
            dtype: self.dtype,
            shape: self.shape.clone(),
            kind,
        }
    }

    /// The type for messages: `f32 [N, 3]`, `seq(f32 [unknown rank])`.
    pub fn describe(&self) -> String {
        self.kind
            .wrap(format!("{} {}", self.dtype, self.shape_string()))
    }

    pub fn shape_string(&self) -> String {
        match &self.shape {
            Some(s) => format_shape(s),
            None => "[unknown rank]".to_string(),
        }
    }
}

/// Broadcasts two symbolic shapes numpy-style. Returns `None` when they clash.
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> Option<Shape> {
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            &a[i + a.len() - rank]
        } else {
            &Dim::Known(1)
        };
        let db = if i + b.len() >= rank {
            &b[i + b.len() - rank]
        } else {
            &Dim::Known(1)
        };
        let d = match (da, db) {
            (Dim::Known(1), d) | (d, Dim::Known(1)) => d.clone(),
            (Dim::Known(x), Dim::Known(y)) if x != y => return None,
            (x, y) if x == y => x.clone(),
            (Dim::Known(x), _) | (_, Dim::Known(x)) => Dim::Known(*x),
            _ => Dim::Unknown,
        };
        out.push(d);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dim_arithmetic_folds_knowns_and_keeps_symbols() {
        let n = Dim::named("N");
        assert_eq!(Dim::Known(3).mul(&Dim::Known(4)), Dim::Known(12));
        assert_eq!(n.mul(&Dim::Known(1)), n);
        assert_eq!(n.div(&n), Dim::Known(1));
        let e = n.mul(&Dim::Known(2));
        assert_eq!(e.to_string(), "N*2");
        let mut b = HashMap::new();
        b.insert("N".to_string(), 5);
        assert_eq!(e.eval(&b), Some(10));
        assert_eq!(Dim::Known(2).sub(&Dim::Known(3)), Dim::Unknown);
    }

    #[test]
    fn broadcast_symbolic() {
        let a = vec![Dim::named("N"), Dim::Known(1), Dim::Known(4)];
        let b = vec![Dim::Known(3), Dim::Known(1)];
        assert_eq!(
            broadcast_shapes(&a, &b),
            Some(vec![Dim::named("N"), Dim::Known(3), Dim::Known(4)])
        );
        assert_eq!(broadcast_shapes(&[Dim::Known(2)], &[Dim::Known(3)]), None);
    }
}
