//! The Session API: load a model once, run it many times, from many threads.

use crate::control_flow::execute;
use crate::plan::Plan;
use crate::{Error, Result};
use kiln_ir::{format_shape, DType, Dim, Graph, Tensor};
use kiln_onnx::{LoadOptions, Model};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// Options for loading a model into a session.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    pub load: LoadOptions,
}

/// A model input or output: name, element type and symbolic shape.
#[derive(Clone, Debug, PartialEq)]
pub struct IoInfo {
    pub name: String,
    pub dtype: DType,
    /// `None` when the rank is unknown.
    pub shape: Option<Vec<Dim>>,
    /// For inputs: whether the model has a default (an initializer) for it.
    pub has_default: bool,
}

impl IoInfo {
    pub fn shape_string(&self) -> String {
        self.shape
            .as_deref()
            .map(format_shape)
            .unwrap_or_else(|| "[unknown rank]".into())
    }
}

/// A loaded, compiled model. `run` takes `&self`: one session serves any number
/// of threads at once (each run has its own value storage).
pub struct Session {
    graph: Graph,
    opset: i64,
    plan: Plan,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
    warnings: Vec<String>,
}

impl Session {
    pub fn load(path: impl AsRef<Path>, options: &SessionOptions) -> Result<Session> {
        let model = kiln_onnx::load_model(path.as_ref(), &options.load)?;
        Session::from_model(model)
    }

    /// Loads a model from bytes (a model with external data needs `load` instead).
    pub fn from_bytes(bytes: &[u8], options: &SessionOptions) -> Result<Session> {
        let model = kiln_onnx::load_model_bytes(bytes, None, &options.load)?;
        Session::from_model(model)
    }

    pub fn from_model(model: Model) -> Result<Session> {
        let mut graph = model.graph;
        let report = kiln_ir::infer::infer_graph(&mut graph, &HashMap::new())
            .map_err(|e| Error::InvalidModel(e.to_string()))?;
        for w in &report.warnings {
            tracing::warn!("{w}");
        }
        let plan = Plan::compile(&graph, &HashSet::new())?;
        let inputs = graph
            .inputs
            .iter()
            .map(|v| IoInfo {
                name: v.name.clone(),
                dtype: v.ty.dtype,
                shape: v.ty.shape.clone(),
                has_default: graph.initializers.contains_key(&v.name),
            })
            .collect();
        let outputs = graph
            .outputs
            .iter()
            .map(|v| IoInfo {
                name: v.name.clone(),
                dtype: v.ty.dtype,
                shape: v.ty.shape.clone(),
                has_default: false,
            })
            .collect();
        Ok(Session {
            graph,
            opset: model.opset,
            plan,
            inputs,
            outputs,
            warnings: report.warnings,
        })
    }

    /// The model's inputs (including ones with defaults, which may be left out).
    pub fn inputs(&self) -> &[IoInfo] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[IoInfo] {
        &self.outputs
    }

    /// The graph after loading and inference.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The model's default-domain opset.
    pub fn opset(&self) -> i64 {
        self.opset
    }

    /// What loading noticed but tolerated (e.g. declared shapes that inference corrected).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Runs the model. Every required input must be given by name; inputs with a
    /// default may be given to override it. Returns every graph output, in order.
    pub fn run(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        let feeds = self.check_inputs(inputs)?;
        let outs = execute(&self.plan, feeds, &[])?;
        Ok(self
            .plan
            .outputs
            .iter()
            .zip(outs)
            .map(|((name, _), t)| {
                (
                    name.clone(),
                    Arc::try_unwrap(t).unwrap_or_else(|a| (*a).clone()),
                )
            })
            .collect())
    }

    /// Validates names, dtypes and shapes of the caller's inputs (binding symbolic
    /// dims consistently across inputs) and maps them to plan slots.
    fn check_inputs(&self, given: Vec<(String, Tensor)>) -> Result<Vec<(usize, Arc<Tensor>)>> {
        let mut bindings: HashMap<String, (usize, String)> = HashMap::new();
        let mut feeds = Vec::with_capacity(given.len());
        let mut seen = HashSet::new();
        for (name, tensor) in given {
            let Some(pos) = self.inputs.iter().position(|i| i.name == name) else {
                let names: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
                return Err(Error::Input(format!(
                    "the model has no input named '{name}'; its inputs are: {}",
                    names.join(", ")
                )));
            };
            if !seen.insert(name.clone()) {
                return Err(Error::Input(format!("input '{name}' is given twice")));
            }
            let info = &self.inputs[pos];
            if tensor.dtype() != info.dtype {
                return Err(Error::Input(format!(
                    "input '{name}' must be {} but {} was given",
                    info.dtype,
                    tensor.dtype()
                )));
            }
            if let Some(shape) = &info.shape {
                let mismatch = || {
                    Error::Input(format!(
                        "input '{name}' must have shape {} but {:?} was given",
                        format_shape(shape),
                        tensor.shape()
                    ))
                };
                if shape.len() != tensor.rank() {
                    return Err(mismatch());
                }
                for (d, &actual) in shape.iter().zip(tensor.shape()) {
                    match d {
                        Dim::Known(v) if *v != actual => return Err(mismatch()),
                        Dim::Named(sym) => match bindings.get(sym) {
                            Some((bound, by)) if *bound != actual => {
                                let other = if *by == name {
                                    "another of its dims has".to_string()
                                } else {
                                    format!("input '{by}' has")
                                };
                                return Err(Error::Input(format!(
                                    "input '{name}' has {sym}={actual} but {other} {sym}={bound}"
                                )));
                            }
                            Some(_) => {}
                            None => {
                                bindings.insert(sym.clone(), (actual, name.clone()));
                            }
                        },
                        _ => {}
                    }
                }
            }
            feeds.push((self.plan.inputs[pos].1, Arc::new(tensor)));
        }
        if let Some(missing) = self
            .inputs
            .iter()
            .find(|i| !i.has_default && !seen.contains(&i.name))
        {
            return Err(Error::Input(format!(
                "missing input '{}' ({} {})",
                missing.name,
                missing.dtype,
                missing.shape_string()
            )));
        }
        Ok(feeds)
    }
}
