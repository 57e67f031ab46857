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

/// The static type of a value: element type and, when known, its (symbolic) shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueType {
    pub dtype: DType,
    /// `None` when even the rank is unknown.
    pub shape: Option<Shape>,
}

impl ValueType {
    pub fn new(dtype: DType, shape: Option<Shape>) -> ValueType {
        ValueType { dtype, shape }
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
