//! GraphProto -> kiln Graph. Each ONNX node becomes one typed `Op`; opset
//! differences are resolved here, once. Attribute forms that newer opsets turned
//! into inputs (axes, pads, split, clip bounds, scales) become constant inputs so
//! that every later stage sees a single form.

use crate::attrs::Attrs;
use crate::proto::{GraphProto, NodeProto, TensorProto, ValueInfoProto};
use crate::tensor_proto::{dtype_from_onnx, tensor_from_proto, TensorLimits};
use crate::{OnnxError, Result};
use kiln_ir::*;
use std::sync::Arc;

/// Shared state while converting a model (and its subgraphs).
pub struct Converter {
    /// Version of the default (`ai.onnx`) opset the model imports.
    pub opset: i64,
    pub limits: TensorLimits,
    /// Counter for names of constants the converter creates.
    next_const: usize,
}

impl Converter {
    pub fn new(opset: i64, limits: TensorLimits) -> Converter {
        Converter {
            opset,
            limits,
            next_const: 0,
        }
    }

    pub fn graph(&mut self, g: &GraphProto, is_main: bool) -> Result<Graph> {
        let mut graph = Graph {
            name: g.name.clone().unwrap_or_default(),
            ..Default::default()
        };
        for init in &g.initializer {
            self.add_initializer(&mut graph, init)?;
        }
        self.graph_body(g, is_main, graph)
    }

    /// [`graph`](Self::graph) on a graph it may consume: each initializer's
    /// proto (with its raw bytes) is freed as soon as it is converted, so a
    /// big model does not hold its weights twice while loading.
    /// `more` supplies initializers read separately (streamed from the file).
    pub fn graph_owned(
        &mut self,
        mut g: GraphProto,
        is_main: bool,
        more: &mut dyn Iterator<Item = Result<TensorProto>>,
    ) -> Result<Graph> {
        let mut graph = Graph {
            name: g.name.clone().unwrap_or_default(),
            ..Default::default()
        };
        for init in std::mem::take(&mut g.initializer) {
            self.add_initializer(&mut graph, &init)?;
        }
        for init in more {
            self.add_initializer(&mut graph, &init?)?;
        }
        self.graph_body(&g, is_main, graph)
    }

    fn add_initializer(&self, graph: &mut Graph, init: &TensorProto) -> Result<()> {
        let name = init.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(OnnxError::Invalid("an initializer has no name".into()));
        }
        let t = tensor_from_proto(init, &self.limits)?;
        graph.initializers.insert(name, Arc::new(t));
        Ok(())
    }

    /// Everything of `g` but its initializers, into `graph`.
    fn graph_body(&mut self, g: &GraphProto, is_main: bool, mut graph: Graph) -> Result<Graph> {
        if !g.sparse_initializer.is_empty() {
            return Err(OnnxError::UnsupportedFeature("sparse initializers".into()));
        }
        for vi in &g.input {
            let mut info = value_info(vi, is_main)?;
            if is_main {
                name_unknown_dims(&mut info);
            }
            graph.inputs.push(info);
        }
        for vi in &g.output {
            graph.outputs.push(value_info(vi, false)?);
        }
        for vi in &g.value_info {
            // Declared intermediate types are hints; ones kiln cannot represent are skipped.
            if let Ok(info) = value_info(vi, true) {
                graph.value_types.insert(info.name, info.ty);
            }
        }
        for (i, node) in g.node.iter().enumerate() {
            self.node(node, i, &mut graph)?;
        }
        Ok(graph)
    }

    fn constant(&mut self, graph: &mut Graph, hint: &str, t: Tensor) -> Option<String> {
        let name = format!("__kiln_const_{}_{}", self.next_const, hint);
        self.next_const += 1;
        graph.initializers.insert(name.clone(), Arc::new(t));
        Some(name)
    }

    /// For a pre-7 PRelu whose slope is a constant 1-D [C] (C > 1) and whose input
    /// rank r is declared: a new constant slope of shape [C, 1, ..., 1] (r - 1 dims).
    fn legacy_channel_slope(
        &mut self,
        graph: &mut Graph,
        inputs: &[Option<String>],
    ) -> Option<Option<String>> {
        let x = inputs.first()?.as_deref()?;
        let slope_name = inputs.get(1)?.as_deref()?;
        let slope = graph.initializers.get(slope_name)?.clone();
        let rank = graph.value_type(x)?.shape?.len();
        if slope.rank() != 1 || slope.len() <= 1 || rank < 2 {
            return None;
        }
        let mut shape = vec![slope.len()];
        shape.resize(rank - 1, 1);
        let reshaped = (*slope).clone().reshaped(shape).ok()?;
        Some(self.constant(graph, "prelu_slope", reshaped))
    }

    fn node(&mut self, n: &NodeProto, index: usize, graph: &mut Graph) -> Result<()> {
        let op_type = n.op_type.as_deref().unwrap_or("");
        let name = match n.name.as_deref() {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => format!("{op_type}_{index}"),
        };
        let domain = n.domain.as_deref().unwrap_or("");
        if !(domain.is_empty() || domain == "ai.onnx") {
            return Err(OnnxError::UnsupportedOp {
                op: format!("{domain}.{op_type}"),
                opset: self.opset,
                node: name,
            });
        }
        let a = Attrs::new(n, &name);
        let mut inputs: Vec<Option<String>> = n
            .input
            .iter()
            .map(|s| if s.is_empty() { None } else { Some(s.clone()) })
            .collect();
        let outputs: Vec<Option<String>> = n
            .output
            .iter()
            .map(|s| if s.is_empty() { None } else { Some(s.clone()) })
            .collect();
        let opset = self.opset;
        let invalid = |msg: String| OnnxError::Invalid(format!("node '{name}' ({op_type}): {msg}"));
        let unsupported = || OnnxError::UnsupportedOp {
            op: op_type.to_string(),
            opset,
            node: name.clone(),
        };

        // Moves an attribute-form list into input slot `slot` as an i64 constant.
        macro_rules! attr_to_input {
            ($attr:expr, $slot:expr) => {
                if let Some(v) = a.ints($attr) {
                    let c = self.constant(graph, $attr, Tensor::vector(v.to_vec()));
                    set_input(&mut inputs, $slot, c);
                }
            };
        }

        let op = match op_type {
            "Constant" => {
                let t = constant_value(&a, &self.limits).map_err(|e| match e {
                    OnnxError::Invalid(m) => invalid(m),
                    other => other,
                })?;
                let out = outputs
                    .first()
                    .cloned()
                    .flatten()
                    .ok_or_else(|| invalid("no output".into()))?;
                graph.initializers.insert(out, Arc::new(t));
                return Ok(());
            }
            "Relu" => Op::Unary(UnaryOp::Relu),
            "Sigmoid" => Op::Unary(UnaryOp::Sigmoid),
            "Tanh" => Op::Unary(UnaryOp::Tanh),
            "Erf" => Op::Unary(UnaryOp::Erf),
            "Sqrt" => Op::Unary(UnaryOp::Sqrt),
            "Reciprocal" => Op::Unary(UnaryOp::Reciprocal),
            "Exp" => Op::Unary(UnaryOp::Exp),
            "Log" => Op::Unary(UnaryOp::Log),
            "Neg" => Op::Unary(UnaryOp::Neg),
            "Abs" => Op::Unary(UnaryOp::Abs),
            "Floor" => Op::Unary(UnaryOp::Floor),
            "Ceil" => Op::Unary(UnaryOp::Ceil),
            "Round" => Op::Unary(UnaryOp::Round),
            "Sign" => Op::Unary(UnaryOp::Sign),
            "Sin" => Op::Unary(UnaryOp::Sin),
            "Cos" => Op::Unary(UnaryOp::Cos),
            "Tan" => Op::Unary(UnaryOp::Tan),
            "Asin" => Op::Unary(UnaryOp::Asin),
            "Acos" => Op::Unary(UnaryOp::Acos),
            "Atan" => Op::Unary(UnaryOp::Atan),
            "Sinh" => Op::Unary(UnaryOp::Sinh),
            "Cosh" => Op::Unary(UnaryOp::Cosh),
            "Asinh" => Op::Unary(UnaryOp::Asinh),
            "Acosh" => Op::Unary(UnaryOp::Acosh),
            "Atanh" => Op::Unary(UnaryOp::Atanh),
            "Softplus" => Op::Unary(UnaryOp::Softplus),
            "Softsign" => Op::Unary(UnaryOp::Softsign),
            "HardSwish" => Op::Unary(UnaryOp::HardSwish),
            "Mish" => Op::Unary(UnaryOp::Mish),
            "Not" => Op::Unary(UnaryOp::Not),
            "BitwiseNot" => Op::Unary(UnaryOp::BitwiseNot),
            "IsNaN" => Op::Unary(UnaryOp::IsNaN),
            "IsInf" => Op::Unary(UnaryOp::IsInf {
                detect_positive: a.bool("detect_positive", true),
                detect_negative: a.bool("detect_negative", true),
            }),
            "LeakyRelu" => Op::Unary(UnaryOp::LeakyRelu {
                alpha: a.float("alpha", 0.01),
            }),
            "HardSigmoid" => Op::Unary(UnaryOp::HardSigmoid {
                alpha: a.float("alpha", 0.2),
                beta: a.float("beta", 0.5),
            }),
            "Elu" => Op::Unary(UnaryOp::Elu {
                alpha: a.float("alpha", 1.0),
            }),
            "Selu" => Op::Unary(UnaryOp::Selu {
                alpha: a.float("alpha", 1.673_263_2),
                gamma: a.float("gamma", 1.050_701),
            }),
            "Celu" => Op::Unary(UnaryOp::Celu {
                alpha: a.float("alpha", 1.0),
            }),
            "ThresholdedRelu" => Op::Unary(UnaryOp::ThresholdedRelu {
                alpha: a.float("alpha", 1.0),
            }),
            "Gelu" => Op::Unary(UnaryOp::Gelu {
                tanh_approx: a.string("approximate", "none")? == "tanh",
            }),

            // Before opset 7, broadcasting was opt-in and could align B at `axis`;
            // trailing alignment (no axis) is numpy broadcasting, anything else is refused.
            "Add" | "Sub" | "Mul" | "Div" | "Pow" | "And" | "Or" | "Xor" | "Equal" | "Less"
            | "Greater"
                if opset < 7 && a.bool("broadcast", false) && a.has("axis") =>
            {
                return Err(OnnxError::UnsupportedFeature(format!(
                    "legacy {op_type} broadcast with an axis (opset {opset}) at node {name}"
                )))
            }
            "Add" => Op::Binary(BinaryOp::Add),
            "Sub" => Op::Binary(BinaryOp::Sub),
            "Mul" => Op::Binary(BinaryOp::Mul),
            "Div" => Op::Binary(BinaryOp::Div),
            "Pow" => Op::Binary(BinaryOp::Pow),
            "Mod" => Op::Binary(BinaryOp::Mod {
                fmod: a.bool("fmod", false),
            }),
            "Equal" => Op::Binary(BinaryOp::Equal),
            "Less" => Op::Binary(BinaryOp::Less),
            "LessOrEqual" => Op::Binary(BinaryOp::LessOrEqual),
            "Greater" => Op::Binary(BinaryOp::Greater),
            "GreaterOrEqual" => Op::Binary(BinaryOp::GreaterOrEqual),
            "And" => Op::Binary(BinaryOp::And),
            "Or" => Op::Binary(BinaryOp::Or),
            "Xor" => Op::Binary(BinaryOp::Xor),
            "BitwiseAnd" => Op::Binary(BinaryOp::BitwiseAnd),
            "BitwiseOr" => Op::Binary(BinaryOp::BitwiseOr),
            "BitwiseXor" => Op::Binary(BinaryOp::BitwiseXor),
            "PRelu" => {
                // Before opset 7 a 1-D slope of length C applied per channel (axis 1);
                // from opset 7 it broadcasts numpy-style. Normalize a constant slope to
                // the [C, 1, ..., 1] shape that broadcasts the same way.
                if opset < 7 {
                    if let Some(c) = self.legacy_channel_slope(graph, &inputs) {
                        set_input(&mut inputs, 1, c);
                    }
                }
                Op::Binary(BinaryOp::PRelu)
            }
            "BitShift" => match a.string("direction", "")?.as_str() {
                "LEFT" => Op::Binary(BinaryOp::BitShiftLeft),
                "RIGHT" => Op::Binary(BinaryOp::BitShiftRight),
                d => {
                    return Err(invalid(format!(
                        "direction must be LEFT or RIGHT, got '{d}'"
                    )))
                }
            },
            "Sum" => Op::Variadic(VariadicOp::Sum),
            "Mean" => Op::Variadic(VariadicOp::Mean),
            "Max" => Op::Variadic(VariadicOp::Max),
            "Min" => Op::Variadic(VariadicOp::Min),
            "Clip" => {
                if opset < 11 {
                    let lo = a.float("min", f32::NEG_INFINITY);
                    let hi = a.float("max", f32::INFINITY);
                    let lo = self.constant(graph, "clip_min", Tensor::scalar(lo));
                    let hi = self.constant(graph, "clip_max", Tensor::scalar(hi));
                    inputs.truncate(1);
                    inputs.push(lo);
                    inputs.push(hi);
                }
                Op::Clip
            }
            "Where" => Op::Where,
            "Cast" => {
                let to = dtype_from_onnx(a.int("to", 0) as i32).map_err(|e| match e {
                    OnnxError::UnsupportedFeature(m) => {
                        OnnxError::UnsupportedFeature(format!("Cast to {m} at node '{name}'"))
                    }
                    other => invalid(other.to_string()),
                })?;
                crate::convert_quant::cast_attrs(&a, Some(to))?.unwrap_or(Op::Cast { to })
            }
            "CastLike" => crate::convert_quant::cast_attrs(&a, None)?.unwrap_or(Op::CastLike),
            "Identity" => Op::Identity,
            "Dropout" => {
                if a.bool("is_test", true) && inputs.len() < 3 {
                    Op::Dropout
                } else if let Some(t) = inputs.get(2).cloned().flatten() {
                    // training_mode must be a constant false for inference.
                    match graph
                        .initializers
                        .get(&t)
                        .and_then(|t| t.as_slice::<bool>().map(|v| v.to_vec()))
                    {
                        Some(v) if v.iter().all(|b| !b) => Op::Dropout,
                        _ => {
                            return Err(OnnxError::UnsupportedFeature(format!(
                                "Dropout in training mode at node '{name}'"
                            )))
                        }
                    }
                } else {
                    Op::Dropout
                }
            }

            "Conv" => Op::Conv(conv_attrs(&a)?),
            "ConvTranspose" => Op::ConvTranspose(ConvTransposeAttrs {
                conv: conv_attrs(&a)?,
                output_padding: a.usizes("output_padding")?,
                output_shape: a.usizes("output_shape")?,
            }),
            "BatchNormalization" => {
                if a.bool("training_mode", false) {
                    return Err(OnnxError::UnsupportedFeature(format!(
                        "BatchNormalization in training mode at node '{name}'"
                    )));
                }
                Op::BatchNormalization {
                    epsilon: a.float("epsilon", 1e-5),
                }
            }
            "InstanceNormalization" => Op::InstanceNormalization {
                epsilon: a.float("epsilon", 1e-5),
            },
            "LayerNormalization" => Op::LayerNormalization {
                axis: a.int("axis", -1),
                epsilon: a.float("epsilon", 1e-5),
            },
            "MaxPool" => Op::MaxPool(pool_attrs(&a)?),
            "AveragePool" => Op::AveragePool(pool_attrs(&a)?),
            "GlobalAveragePool" => Op::GlobalAveragePool,
            "GlobalMaxPool" => Op::GlobalMaxPool,
            "Gemm" => Op::Gemm {
                alpha: a.float("alpha", 1.0),
                beta: a.float("beta", 1.0),
                trans_a: a.bool("transA", false),
                trans_b: a.bool("transB", false),
            },
            "MatMul" => Op::MatMul,
            "Softmax" | "LogSoftmax" => {
                let coerce_2d = opset < 13;
                let axis = a.int("axis", if coerce_2d { 1 } else { -1 });
                if op_type == "Softmax" {
                    Op::Softmax { axis, coerce_2d }
                } else {
                    Op::LogSoftmax { axis, coerce_2d }
                }
            }
            "Resize" => {
                let attrs = resize_attrs(&a, opset)?;
                if opset < 11 {
                    // Resize-10: (X, scales) -> (X, roi, scales).
                    let scales = inputs.get(1).cloned().flatten();
                    inputs = vec![inputs.first().cloned().flatten(), None, scales];
                }
                Op::Resize(attrs)
            }
            "Upsample" => {
                let mut attrs = resize_attrs(&a, 10)?;
                attrs.nearest = NearestMode::Floor;
                let scales = if opset < 9 {
                    let s = a
                        .floats("scales")
                        .ok_or_else(|| invalid("needs the 'scales' attribute".into()))?;
                    self.constant(graph, "scales", Tensor::vector(s.to_vec()))
                } else {
                    inputs.get(1).cloned().flatten()
                };
                inputs = vec![inputs.first().cloned().flatten(), None, scales];
                Op::Resize(attrs)
            }
            "LSTM" => Op::Lstm(lstm_attrs(&a)?),

            "Reshape" => {
                if opset < 5 {
                    attr_to_input!("shape", 1);
                }
                Op::Reshape {
                    allowzero: a.bool("allowzero", false),
                }
            }
            "Flatten" => Op::Flatten {
                axis: a.int("axis", 1),
            },
            "Transpose" => Op::Transpose {
                perm: a.ints("perm").map(|p| p.to_vec()),
            },
            "Squeeze" => {
                if opset < 13 {
                    attr_to_input!("axes", 1);
                }
                Op::Squeeze
            }
            "Unsqueeze" => {
                if opset < 13 {
                    attr_to_input!("axes", 1);
                }
                Op::Unsqueeze
            }
            "Concat" => Op::Concat {
                // Concat-1 defaulted to axis 1; from opset 4 the axis is required.
                axis: match a.int_opt("axis") {
                    Some(axis) => axis,
                    None if opset < 4 => 1,
                    None => return Err(invalid("the 'axis' attribute is required".into())),
                },
            },
            "Split" => {
                if opset < 13 {
                    attr_to_input!("split", 1);
                }
                let n = a.int("num_outputs", outputs.len() as i64);
                Op::Split {
                    axis: a.int("axis", 0),
                    num_outputs: n.max(1) as usize,
                }
            }
            "Slice" => {
                if opset < 10 {
                    let starts = a
                        .ints("starts")
                        .ok_or_else(|| invalid("needs 'starts'".into()))?
                        .to_vec();
                    let ends = a
                        .ints("ends")
                        .ok_or_else(|| invalid("needs 'ends'".into()))?
                        .to_vec();
                    let s = self.constant(graph, "starts", Tensor::vector(starts));
                    let e = self.constant(graph, "ends", Tensor::vector(ends));
                    let ax = match a.ints("axes") {
                        Some(v) => self.constant(graph, "axes", Tensor::vector(v.to_vec())),
                        None => None,
                    };
                    inputs.truncate(1);
                    inputs.extend([s, e, ax]);
                }
                Op::Slice
            }
            "Gather" => Op::Gather {
                axis: a.int("axis", 0),
            },
            "GatherElements" => Op::GatherElements {
                axis: a.int("axis", 0),
            },
            "Expand" => Op::Expand,
            "Pad" => {
                let mode = match a.string("mode", "constant")?.as_str() {
                    "constant" => PadMode::Constant,
                    "reflect" => PadMode::Reflect,
                    "edge" => PadMode::Edge,
                    "wrap" => PadMode::Wrap,
                    m => return Err(invalid(format!("unknown pad mode '{m}'"))),
                };
                if opset < 11 {
                    let pads = a
                        .ints("pads")
                        .or_else(|| a.ints("paddings"))
                        .unwrap_or(&[])
                        .to_vec();
                    let p = self.constant(graph, "pads", Tensor::vector(pads));
                    let v =
                        self.constant(graph, "pad_value", Tensor::scalar(a.float("value", 0.0)));
                    inputs.truncate(1);
                    inputs.extend([p, v]);
                }
                Op::Pad { mode }
            }
            "Shape" => Op::Shape {
                start: a.int("start", 0),
                end: a.int_opt("end"),
            },
            "Size" => Op::Size,
            "ConstantOfShape" => {
                let value = match a.tensor("value") {
                    Some(t) => tensor_from_proto(t, &self.limits)?,
                    None => Tensor::scalar(0.0f32),
                };
                if value.len() != 1 {
                    return Err(invalid(format!(
                        "'value' must hold one element, got {}",
                        value.len()
                    )));
                }
                Op::ConstantOfShape { value }
            }
            "Range" => Op::Range,
            "Tile" => Op::Tile,
            "Trilu" => Op::Trilu {
                upper: a.bool("upper", true),
            },
            "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1"
            | "ReduceL2" | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceSumSquare" => {
                let axes_are_input = if op_type == "ReduceSum" {
                    opset >= 13
                } else {
                    opset >= 18
                };
                if !axes_are_input {
                    inputs.truncate(1);
                    attr_to_input!("axes", 1);
                }
                let op = match op_type {
                    "ReduceSum" => ReduceOp::Sum,
                    "ReduceMean" => ReduceOp::Mean,
                    "ReduceMax" => ReduceOp::Max,
                    "ReduceMin" => ReduceOp::Min,
                    "ReduceProd" => ReduceOp::Prod,
                    "ReduceL1" => ReduceOp::L1,
                    "ReduceL2" => ReduceOp::L2,
                    "ReduceLogSum" => ReduceOp::LogSum,
                    "ReduceLogSumExp" => ReduceOp::LogSumExp,
                    _ => ReduceOp::SumSquare,
                };
                Op::Reduce {
                    op,
                    keepdims: a.bool("keepdims", true),
                    noop_with_empty_axes: a.bool("noop_with_empty_axes", false),
                }
            }
            "ArgMax" | "ArgMin" => {
                let (axis, keepdims, select_last_index) = (
                    a.int("axis", 0),
                    a.bool("keepdims", true),
                    a.bool("select_last_index", false),
                );
                if op_type == "ArgMax" {
                    Op::ArgMax {
                        axis,
                        keepdims,
                        select_last_index,
                    }
                } else {
                    Op::ArgMin {
                        axis,
                        keepdims,
                        select_last_index,
                    }
                }
            }
            "If" => {
                let then_branch = Box::new(self.graph(a.graph("then_branch")?, false)?);
                let else_branch = Box::new(self.graph(a.graph("else_branch")?, false)?);
                Op::If {
                    then_branch,
                    else_branch,
                }
            }
            "Loop" => Op::Loop {
                body: Box::new(self.graph(a.graph("body")?, false)?),
            },
            _ => {
                let mut ctx = NodeCtx {
                    opset,
                    name: &name,
                    attrs: &a,
                    inputs: &mut inputs,
                    num_outputs: outputs.len(),
                    graph,
                    conv: self,
                };
                match family_op(op_type, &mut ctx)? {
                    Some(op) => op,
                    None => return Err(unsupported()),
                }
            }
        };
        graph.nodes.push(Node {
            name,
            op,
            inputs,
            outputs,
        });
        Ok(())
    }
}

/// What a family converter (`convert_*.rs`) sees of the node it parses.
#[allow(dead_code)] // fields and helpers are for the family converters as they grow
pub(crate) struct NodeCtx<'a, 'b> {
    /// The model's default-domain opset.
    pub opset: i64,
    pub name: &'a str,
    pub attrs: &'a Attrs<'b>,
    /// The node's inputs; a converter may normalize them (e.g. attribute -> input).
    pub inputs: &'a mut Vec<Option<String>>,
    pub num_outputs: usize,
    pub graph: &'a mut Graph,
    pub conv: &'a mut Converter,
}

#[allow(dead_code)]
impl NodeCtx<'_, '_> {
    /// Adds a constant to the graph and returns its name (for normalizing
    /// attribute-form parameters into inputs).
    pub fn constant(&mut self, hint: &str, t: Tensor) -> Option<String> {
        self.conv.constant(self.graph, hint, t)
    }

    /// Sets input `slot`, growing the input list as needed.
    pub fn set_input(&mut self, slot: usize, v: Option<String>) {
        set_input(self.inputs, slot, v)
    }

    /// Converts a graph-valued attribute (a Scan or SequenceMap body).
    pub fn subgraph(&mut self, attr: &str) -> Result<Graph> {
        let g = self.attrs.graph(attr)?;
        self.conv.graph(g, false)
    }

    /// Decodes a tensor-valued attribute.
    pub fn tensor_attr(&self, attr: &str) -> Result<Option<Tensor>> {
        self.attrs
            .tensor(attr)
            .map(|t| tensor_from_proto(t, &self.conv.limits))
            .transpose()
    }

    /// An "invalid model" error naming this node.
    pub fn invalid(&self, msg: impl std::fmt::Display) -> OnnxError {
        OnnxError::Invalid(format!("node '{}': {msg}", self.name))
    }

    /// An "unsupported feature" error naming this node.
    pub fn unsupported(&self, what: impl std::fmt::Display) -> OnnxError {
        OnnxError::UnsupportedFeature(format!("{what} at node {}", self.name))
    }
}

/// Tries each op family's converter in turn.
fn family_op(op_type: &str, ctx: &mut NodeCtx) -> Result<Option<Op>> {
    let families: [fn(&str, &mut NodeCtx) -> Result<Option<Op>>; 6] = [
        crate::convert_quant::convert,
        crate::convert_index::convert,
        crate::convert_vision::convert,
        crate::convert_attn::convert,
        crate::convert_seq::convert,
        crate::convert_text::convert,
    ];
    for f in families {
        if let Some(op) = f(op_type, ctx)? {
            return Ok(Some(op));
        }
    }
    Ok(None)
}

fn set_input(inputs: &mut Vec<Option<String>>, slot: usize, v: Option<String>) {
    if inputs.len() <= slot {
        inputs.resize(slot + 1, None);
    }
    inputs[slot] = v;
}

/// Gives each unnamed dim of a main-graph tensor input (`?` or empty) a
/// symbol of its own, `unk:<input>:<axis>`. A run binds it like a named dim;
/// until then shape inference can tell that `x + 3` has `x`'s shape, which
/// the optimizer's rewrites need (paddle2onnx's PP-OCR recognizer declares
/// `[N, 3, ?, W]`, and none of its HardSwish patterns were recognized).
/// Two such dims are never the same symbol, as two `?` are not.
fn name_unknown_dims(info: &mut ValueInfo) {
    if !info.ty.is_tensor() {
        return;
    }
    if let Some(shape) = info.ty.shape.as_mut() {
        for (axis, d) in shape.iter_mut().enumerate() {
            if *d == Dim::Unknown {
                *d = Dim::Named(format!("unk:{}:{axis}", info.name));
            }
        }
    }
}

/// A graph input/output/value_info entry. `require_type`: main-graph inputs must
/// say their element type; elsewhere a missing type is left for inference.
fn value_info(vi: &ValueInfoProto, require_type: bool) -> Result<ValueInfo> {
    let name = vi.name.clone().unwrap_or_default();
    let ty = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(v) => value_type(v, &name, 0)?,
        None if require_type => {
            return Err(OnnxError::Invalid(format!(
                "graph input '{name}' has no type"
            )));
        }
        // Untyped subgraph outputs: the element type is filled in by inference.
        None => ValueType::new(DType::F32, None),
    };
    Ok(ValueInfo { name, ty })
}

/// A tensor type, or a sequence / optional of tensor types (nested up to a few levels).
fn value_type(v: &crate::proto::type_proto::Value, name: &str, depth: usize) -> Result<ValueType> {
    use crate::proto::type_proto::Value as V;
    let inner = |elem: Option<&crate::proto::TypeProto>| -> Result<ValueType> {
        if depth >= 8 {
            return Err(OnnxError::UnsupportedFeature(format!(
                "value '{name}' nests sequences/optionals more than 8 deep"
            )));
        }
        match elem.and_then(|t| t.value.as_ref()) {
            Some(v) => value_type(v, name, depth + 1),
            None => Err(OnnxError::Invalid(format!(
                "value '{name}': a sequence or optional type without an element type"
            ))),
        }
    };
    match v {
        V::TensorType(t) => tensor_type(t, name),
        V::SequenceType(s) => Ok(ValueType::sequence_of(inner(s.elem_type.as_deref())?)),
        V::OptionalType(o) => Ok(ValueType::optional_of(inner(o.elem_type.as_deref())?)),
        V::MapType(_) => Err(OnnxError::UnsupportedFeature(format!(
            "value '{name}' is a map (maps are not supported)"
        ))),
        V::SparseTensorType(_) => Err(OnnxError::UnsupportedFeature(format!(
            "value '{name}' is a sparse tensor (sparse tensors are not supported)"
        ))),
        V::OpaqueType(_) => Err(OnnxError::UnsupportedFeature(format!(
            "value '{name}' has an opaque type"
        ))),
    }
}

fn tensor_type(t: &crate::proto::type_proto::Tensor, name: &str) -> Result<ValueType> {
    let dtype = match t.elem_type {
        Some(0) | None => DType::F32,
        Some(code) => dtype_from_onnx(code).map_err(|e| match e {
            OnnxError::UnsupportedFeature(m) => {
                OnnxError::UnsupportedFeature(format!("{m} (value '{name}')"))
            }
            other => other,
        })?,
    };
    let shape = t.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(crate::proto::tensor_shape_proto::dimension::Value::DimValue(v))
                    if *v >= 0 =>
                {
                    Dim::Known(*v as usize)
                }
                // "?" is how several exporters (paddle2onnx, tf2onnx) spell "unknown";
                // two "?" dims are not the same symbol.
                Some(crate::proto::tensor_shape_proto::dimension::Value::DimParam(p))
                    if !p.is_empty() && p != "?" =>
                {
                    Dim::Named(p.clone())
                }
                _ => Dim::Unknown,
            })
            .collect()
    });
    Ok(ValueType::new(dtype, shape))
}

/// The `auto_pad` attribute of Conv, ConvTranspose, the pools and the families' conv-like ops.
pub(crate) fn auto_pad(a: &Attrs) -> Result<AutoPad> {
    Ok(match a.string("auto_pad", "NOTSET")?.as_str() {
        "NOTSET" | "" => AutoPad::NotSet,
        "SAME_UPPER" => AutoPad::SameUpper,
        "SAME_LOWER" => AutoPad::SameLower,
        "VALID" => AutoPad::Valid,
        other => return Err(a.err("auto_pad", &format!("has the unknown value '{other}'"))),
    })
}

/// The attributes of Conv (ConvTranspose, ConvInteger and QLinearConv share them).
pub(crate) fn conv_attrs(a: &Attrs) -> Result<ConvAttrs> {
    let group = a.int("group", 1);
    if group < 1 {
        return Err(a.err("group", &format!("must be >= 1, got {group}")));
    }
    Ok(ConvAttrs {
        auto_pad: auto_pad(a)?,
        dilations: a.usizes("dilations")?,
        group: group as usize,
        kernel_shape: a.usizes("kernel_shape")?,
        pads: a.usizes("pads")?,
        strides: a.usizes("strides")?,
    })
}

fn pool_attrs(a: &Attrs) -> Result<PoolAttrs> {
    if a.int("storage_order", 0) != 0 {
        return Err(OnnxError::UnsupportedFeature(
            "MaxPool storage_order=1".into(),
        ));
    }
    Ok(PoolAttrs {
        auto_pad: auto_pad(a)?,
        ceil_mode: a.bool("ceil_mode", false),
        dilations: a.usizes("dilations")?,
        kernel_shape: a.usizes("kernel_shape")?,
        pads: a.usizes("pads")?,
        strides: a.usizes("strides")?,
        count_include_pad: a.bool("count_include_pad", false),
    })
}

fn resize_attrs(a: &Attrs, opset: i64) -> Result<ResizeAttrs> {
    let mode = match a.string("mode", "nearest")?.as_str() {
        "nearest" => ResizeMode::Nearest,
        "linear" | "bilinear" | "trilinear" => ResizeMode::Linear,
        "cubic" | "bicubic" => ResizeMode::Cubic,
        m => return Err(OnnxError::Invalid(format!("unknown resize mode '{m}'"))),
    };
    // Resize-10 and Upsample always used the asymmetric transform.
    let default_coord = if opset < 11 {
        "asymmetric"
    } else {
        "half_pixel"
    };
    let coord = match a
        .string("coordinate_transformation_mode", default_coord)?
        .as_str()
    {
        "half_pixel" => CoordTransform::HalfPixel,
        "half_pixel_symmetric" => CoordTransform::HalfPixelSymmetric,
        "pytorch_half_pixel" => CoordTransform::PytorchHalfPixel,
        "align_corners" => CoordTransform::AlignCorners,
        "asymmetric" => CoordTransform::Asymmetric,
        "tf_crop_and_resize" => CoordTransform::TfCropAndResize,
        m => {
            return Err(OnnxError::UnsupportedFeature(format!(
                "Resize coordinate_transformation_mode '{m}'"
            )))
        }
    };
    let default_nearest = if opset < 11 {
        "floor"
    } else {
        "round_prefer_floor"
    };
    let nearest = match a.string("nearest_mode", default_nearest)?.as_str() {
        "round_prefer_floor" => NearestMode::RoundPreferFloor,
        "round_prefer_ceil" => NearestMode::RoundPreferCeil,
        "floor" => NearestMode::Floor,
        "ceil" => NearestMode::Ceil,
        m => return Err(OnnxError::Invalid(format!("unknown nearest_mode '{m}'"))),
    };
    let keep_aspect_ratio = match a.string("keep_aspect_ratio_policy", "stretch")?.as_str() {
        "stretch" => KeepAspect::Stretch,
        "not_larger" => KeepAspect::NotLarger,
        "not_smaller" => KeepAspect::NotSmaller,
        m => {
            return Err(OnnxError::Invalid(format!(
                "unknown keep_aspect_ratio_policy '{m}'"
            )))
        }
    };
    Ok(ResizeAttrs {
        mode,
        coord,
        nearest,
        cubic_coeff_a: a.float("cubic_coeff_a", -0.75),
        exclude_outside: a.bool("exclude_outside", false),
        extrapolation_value: a.float("extrapolation_value", 0.0),
        antialias: a.bool("antialias", false),
        axes: a.ints("axes").map(|v| v.to_vec()).unwrap_or_default(),
        keep_aspect_ratio,
    })
}

fn lstm_attrs(a: &Attrs) -> Result<LstmAttrs> {
    let direction = match a.string("direction", "forward")?.as_str() {
        "forward" => RnnDirection::Forward,
        "reverse" => RnnDirection::Reverse,
        "bidirectional" => RnnDirection::Bidirectional,
        d => return Err(OnnxError::Invalid(format!("unknown LSTM direction '{d}'"))),
    };
    let hidden_size = a.int("hidden_size", 0);
    if hidden_size <= 0 {
        return Err(OnnxError::Invalid(format!(
            "LSTM hidden_size must be positive, got {hidden_size}"
        )));
    }
    if a.has("activation_alpha") || a.has("activation_beta") {
        return Err(OnnxError::UnsupportedFeature(
            "LSTM activation_alpha/activation_beta".into(),
        ));
    }
    let mut activations = Vec::new();
    for s in a.strings("activations")? {
        activations.push(match s.to_ascii_lowercase().as_str() {
            "sigmoid" => Activation::Sigmoid,
            "tanh" => Activation::Tanh,
            "relu" => Activation::Relu,
            other => {
                return Err(OnnxError::UnsupportedFeature(format!(
                    "LSTM activation '{other}'"
                )))
            }
        });
    }
    Ok(LstmAttrs {
        direction,
        hidden_size: hidden_size as usize,
        activations,
        clip: a.float_opt("clip"),
        input_forget: a.bool("input_forget", false),
        layout: a.int("layout", 0),
    })
}

/// The tensor a `Constant` node holds, from whichever attribute form it uses.
fn constant_value(a: &Attrs, limits: &TensorLimits) -> Result<Tensor> {
    if let Some(t) = a.tensor("value") {
        return tensor_from_proto(t, limits);
    }
    if a.has("sparse_value") {
        return Err(OnnxError::UnsupportedFeature(
            "Constant with sparse_value".into(),
        ));
    }
    if let Some(f) = a.float_opt("value_float") {
        return Ok(Tensor::scalar(f));
    }
    if let Some(v) = a.floats("value_floats") {
        return Ok(Tensor::vector(v.to_vec()));
    }
    if let Some(i) = a.int_opt("value_int") {
        return Ok(Tensor::scalar(i));
    }
    if let Some(v) = a.ints("value_ints") {
        return Ok(Tensor::vector(v.to_vec()));
    }
    if a.has("value_string") {
        return Ok(Tensor::scalar(a.string("value_string", "")?));
    }
    if a.has("value_strings") {
        return Ok(Tensor::vector(a.strings("value_strings")?));
    }
    Err(OnnxError::Invalid("Constant has no value attribute".into()))
}

#[cfg(test)]
mod tests {
    use crate::proto::tensor_shape_proto::{dimension::Value as DimValue, Dimension};
    use crate::proto::{
        type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto,
        TypeProto, ValueInfoProto,
    };
    use crate::{load_model_bytes, LoadOptions};
    use kiln_ir::Dim;
    use prost::Message;

    fn input(name: &str, dims: Vec<Option<DimValue>>) -> ValueInfoProto {
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .into_iter()
                            .map(|value| Dimension {
                                value,
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn unnamed_input_dims_get_symbols_of_their_own() {
        let p = |s: &str| Some(DimValue::DimParam(s.into()));
        let model = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            graph: Some(GraphProto {
                name: Some("g".into()),
                node: vec![NodeProto {
                    op_type: Some("Add".into()),
                    input: vec!["x".into(), "z".into()],
                    output: vec!["y".into()],
                    ..Default::default()
                }],
                input: vec![
                    input("x", vec![p("N"), Some(DimValue::DimValue(3)), p("?"), None]),
                    input(
                        "z",
                        vec![p("N"), Some(DimValue::DimValue(3)), p(""), p("?")],
                    ),
                ],
                output: vec![input("y", vec![p("?"), None, None, None])],
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = load_model_bytes(&model.encode_to_vec(), None, &LoadOptions::default()).unwrap();
        let shape = |i: usize| m.graph.inputs[i].ty.shape.clone().unwrap();
        let named = |s: &str| Dim::Named(s.into());
        assert_eq!(
            shape(0),
            vec![
                named("N"),
                Dim::Known(3),
                named("unk:x:2"),
                named("unk:x:3")
            ]
        );
        assert_eq!(
            shape(1),
            vec![
                named("N"),
                Dim::Known(3),
                named("unk:z:2"),
                named("unk:z:3")
            ]
        );
        // Outputs keep unknown dims unknown (inference fills them in).
        assert_eq!(
            m.graph.outputs[0].ty.shape.clone().unwrap()[0],
            Dim::Unknown
        );
    }
}
