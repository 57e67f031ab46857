//! Typed access to a node's attributes, with errors that name the node.

use crate::proto::{AttributeProto, GraphProto, NodeProto, TensorProto};
use crate::{OnnxError, Result};

pub struct Attrs<'a> {
    node: &'a NodeProto,
    node_name: &'a str,
}

impl<'a> Attrs<'a> {
    pub fn new(node: &'a NodeProto, node_name: &'a str) -> Attrs<'a> {
        Attrs { node, node_name }
    }

    fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.node
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// An "invalid model" error naming the node, its op and the attribute.
    pub fn err(&self, name: &str, what: &str) -> OnnxError {
        OnnxError::Invalid(format!(
            "node '{}' ({}): attribute '{}' {}",
            self.node_name,
            self.node.op_type.as_deref().unwrap_or("?"),
            name,
            what
        ))
    }

    pub fn int_opt(&self, name: &str) -> Option<i64> {
        self.get(name).and_then(|a| a.i)
    }

    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.int_opt(name).unwrap_or(default)
    }

    pub fn bool(&self, name: &str, default: bool) -> bool {
        self.int_opt(name).map(|v| v != 0).unwrap_or(default)
    }

    pub fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).and_then(|a| a.f).unwrap_or(default)
    }

    pub fn float_opt(&self, name: &str) -> Option<f32> {
        self.get(name).and_then(|a| a.f)
    }

    pub fn string(&self, name: &str, default: &str) -> Result<String> {
        match self.get(name).and_then(|a| a.s.as_ref()) {
            Some(bytes) => {
                String::from_utf8(bytes.clone()).map_err(|_| self.err(name, "is not valid UTF-8"))
            }
            None => Ok(default.to_string()),
        }
    }

    pub fn ints(&self, name: &str) -> Option<&'a [i64]> {
        self.get(name).map(|a| a.ints.as_slice())
    }

    /// A list of non-negative ints (kernel shapes, strides, pads).
    pub fn usizes(&self, name: &str) -> Result<Vec<usize>> {
        self.ints(name)
            .unwrap_or(&[])
            .iter()
            .map(|&v| {
                usize::try_from(v).map_err(|_| self.err(name, &format!("has a negative value {v}")))
            })
            .collect()
    }

    pub fn floats(&self, name: &str) -> Option<&'a [f32]> {
        self.get(name).map(|a| a.floats.as_slice())
    }

    pub fn strings(&self, name: &str) -> Result<Vec<String>> {
        self.get(name)
            .map(|a| a.strings.as_slice())
            .unwrap_or(&[])
            .iter()
            .map(|b| String::from_utf8(b.clone()).map_err(|_| self.err(name, "is not valid UTF-8")))
            .collect()
    }

    pub fn tensor(&self, name: &str) -> Option<&'a TensorProto> {
        self.get(name).and_then(|a| a.t.as_ref())
    }

    pub fn graph(&self, name: &str) -> Result<&'a GraphProto> {
        self.get(name)
            .and_then(|a| a.g.as_ref())
            .ok_or_else(|| self.err(name, "(a graph) is missing"))
    }
}
