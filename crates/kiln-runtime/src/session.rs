//! The Session API: load a model once, run it many times, from many threads.

use crate::control_flow::execute_profiled;
use crate::plan::Plan;
use crate::value::{Val, Value};
use crate::{Error, Result};
use kiln_ir::{format_shape, DType, Dim, Graph, Tensor, ValueKind, ValueType};
use kiln_onnx::{LoadOptions, Model};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// Options for loading a model into a session.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub load: LoadOptions,
    /// Compute threads for this session's kernels (`None`: one per core).
    /// Sessions with the same count share one pool.
    pub threads: Option<usize>,
    /// Run the graph optimizer (folding, fusion) before compiling the plan.
    pub optimize: bool,
    /// Symbolic input dims fixed at load, by name (as ONNX Runtime's free
    /// dimension overrides and OpenVINO's reshape do): shapes are inferred,
    /// folded and the plan compiled for these sizes, and every run's inputs
    /// must have them. Applies to tensor inputs without a default; names no
    /// such input uses are ignored ([`Session::fixed_dims`] lists the ones
    /// used). A name given twice, or sizes that make an input's element
    /// count overflow, are errors.
    pub fixed_dims: Vec<(String, usize)>,
}

impl Default for SessionOptions {
    fn default() -> SessionOptions {
        SessionOptions {
            load: LoadOptions::default(),
            threads: None,
            optimize: true,
            fixed_dims: Vec::new(),
        }
    }
}

/// How long one node took in [`Session::run_profiled`], with the dtypes and
/// shapes it saw (`None` for an absent input or a non-tensor value).
#[derive(Clone, Debug)]
pub struct NodeTiming {
    pub node: String,
    pub op: &'static str,
    pub seconds: f64,
    pub inputs: Vec<Option<(DType, Vec<usize>)>>,
    pub outputs: Vec<Option<(DType, Vec<usize>)>>,
}

/// A model input or output: name, element type and symbolic shape, and whether
/// it is a tensor, a sequence or an optional (`kind`; for those, `dtype` and
/// `shape` describe the tensors inside).
#[derive(Clone, Debug, PartialEq)]
pub struct IoInfo {
    pub name: String,
    pub dtype: DType,
    /// `None` when the rank is unknown.
    pub shape: Option<Vec<Dim>>,
    pub kind: ValueKind,
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

    /// The full type: `f32 [N, 3]`, `seq(i64 [unknown rank])`, `optional(f32 [4])`.
    pub fn type_string(&self) -> String {
        ValueType {
            dtype: self.dtype,
            shape: self.shape.clone(),
            kind: self.kind.clone(),
        }
        .describe()
    }
}

/// A loaded, compiled model. `run` takes `&self`: one session serves any number
/// of threads at once (each run has its own value storage).
pub struct Session {
    graph: Graph,
    opset: i64,
    plan: Plan,
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
    warnings: Vec<String>,
    /// (elements, bytes) of the model's weights after optimization.
    parameters: (usize, usize),
    /// The symbolic dims fixed at load that some input used (named in
    /// input errors).
    fixed: Vec<(String, usize)>,
}

/// Fixed dims as `N=2, S=128`, for messages.
fn fixed_text(fixed: &[(String, usize)]) -> String {
    let parts: Vec<String> = fixed.iter().map(|(n, v)| format!("{n}={v}")).collect();
    parts.join(", ")
}

/// Replaces the named dims listed in `fixed` by their sizes in the shapes
/// of the graph's tensor inputs, and returns those it replaced.
/// Inputs with a default (an initializer) keep their shapes: runs that
/// leave them out feed the default, whatever its size. Sequence and
/// optional inputs keep theirs too (their elements' dims are not bound
/// across inputs).
fn fix_input_dims(graph: &mut Graph, fixed: &[(String, usize)]) -> Result<Vec<(String, usize)>> {
    let mut applied: Vec<(String, usize)> = Vec::new();
    for (i, (name, _)) in fixed.iter().enumerate() {
        if fixed[..i].iter().any(|(n, _)| n == name) {
            return Err(Error::Input(format!("dim '{name}' is fixed twice")));
        }
    }
    for input in &mut graph.inputs {
        if input.ty.kind != ValueKind::Tensor || graph.initializers.contains_key(&input.name) {
            continue;
        }
        let Some(shape) = input.ty.shape.as_mut() else {
            continue;
        };
        let mut touched = false;
        for d in shape.iter_mut() {
            let Dim::Named(name) = d else { continue };
            if let Some(f) = fixed.iter().find(|(n, _)| n == name) {
                if !applied.contains(f) {
                    applied.push(f.clone());
                }
                *d = Dim::Known(f.1);
                touched = true;
            }
        }
        if !touched {
            continue;
        }
        let count = shape
            .iter()
            .filter_map(Dim::known)
            .try_fold(1usize, |acc, d| acc.checked_mul(d));
        if count.is_none_or(|c| c > isize::MAX as usize / 16) {
            return Err(Error::Input(format!(
                "input '{}' would have {} with the fixed dims: too many elements",
                input.name,
                format_shape(shape)
            )));
        }
    }
    Ok(applied)
}

impl Session {
    pub fn load(path: impl AsRef<Path>, options: &SessionOptions) -> Result<Session> {
        let _allocs = crate::load_alloc::LoadAllocs::begin();
        let model = kiln_onnx::load_model(path.as_ref(), &options.load)?;
        Session::from_model_with(model, options)
    }

    /// Loads a model from bytes (a model with external data needs `load` instead).
    pub fn from_bytes(bytes: &[u8], options: &SessionOptions) -> Result<Session> {
        let _allocs = crate::load_alloc::LoadAllocs::begin();
        let model = kiln_onnx::load_model_bytes(bytes, None, &options.load)?;
        Session::from_model_with(model, options)
    }

    /// A session with default options.
    pub fn from_model(model: Model) -> Result<Session> {
        Session::from_model_with(model, &SessionOptions::default())
    }

    pub fn from_model_with(model: Model, options: &SessionOptions) -> Result<Session> {
        let _allocs = crate::load_alloc::LoadAllocs::begin();
        let threads = options.threads.unwrap_or(0);
        let pool = crate::pool::shared_pool(threads).map_err(Error::Resource)?;
        let threads = pool.current_num_threads();
        let mut graph = model.graph;
        let fixed = fix_input_dims(&mut graph, &options.fixed_dims)?;
        let report = kiln_ir::infer::infer_graph(&mut graph, &HashMap::new()).map_err(|e| {
            if fixed.is_empty() {
                Error::InvalidModel(e.to_string())
            } else {
                Error::InvalidModel(format!("with dims fixed at {}: {e}", fixed_text(&fixed)))
            }
        })?;
        for w in &report.warnings {
            tracing::warn!("{w}");
        }
        let mut report = report;
        if options.optimize {
            let before = graph.clone();
            match kiln_opt::optimize(&mut graph, &kiln_opt::OptOptions::default()) {
                Ok(opt) => {
                    tracing::debug!(
                        "optimizer: {} -> {} nodes {:?}",
                        opt.nodes_before,
                        opt.nodes_after,
                        opt.passes
                    );
                    // Fused ops and folded constants need their types again.
                    match kiln_ir::infer::infer_graph(&mut graph, &HashMap::new()) {
                        Ok(r) => report = r,
                        Err(e) => {
                            // A rewrite the optimizer got wrong must not cost the
                            // user their model: run it unoptimized, loudly.
                            tracing::warn!(
                                "the optimized graph does not re-infer ({e}); running the model unoptimized"
                            );
                            graph = before;
                        }
                    }
                }
                Err(e) => tracing::warn!("optimizer skipped: {e}"),
            }
        }
        let parameters = graph.parameter_stats();
        // The plan's prepared kernels hold some weights packed and free the
        // originals as they go (keeping both would double the model's
        // memory). Their types stay in the graph.
        let mut inits = std::mem::take(&mut graph.initializers);
        let compiled = Plan::compile_releasing(&graph, &mut inits);
        graph.initializers = inits;
        let plan = compiled?;
        for (name, ty) in &plan.released {
            graph.value_types.insert(name.clone(), ty.clone());
        }
        let inputs = graph
            .inputs
            .iter()
            .map(|v| IoInfo {
                name: v.name.clone(),
                dtype: v.ty.dtype,
                shape: v.ty.shape.clone(),
                kind: v.ty.kind.clone(),
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
                kind: v.ty.kind.clone(),
                has_default: false,
            })
            .collect();
        Ok(Session {
            graph,
            opset: model.opset,
            plan,
            pool,
            threads,
            inputs,
            outputs,
            warnings: report.warnings,
            parameters,
            fixed,
        })
    }

    /// The dims fixed at load (`SessionOptions::fixed_dims`) that some input
    /// used, with their sizes.
    pub fn fixed_dims(&self) -> &[(String, usize)] {
        &self.fixed
    }

    /// The model's inputs (including ones with defaults, which may be left out).
    pub fn inputs(&self) -> &[IoInfo] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[IoInfo] {
        &self.outputs
    }

    /// The model's weights after optimization: (elements, bytes), including
    /// the ones the plan holds packed (which `graph()` no longer lists).
    pub fn parameter_stats(&self) -> (usize, usize) {
        self.parameters
    }

    /// The graph after loading, inference and optimization. Weights the plan
    /// holds packed (Conv W, MatMul/Gemm B) are not among its initializers:
    /// their types are in `value_types`.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// How many compute threads this session's kernels use.
    pub fn threads(&self) -> usize {
        self.threads
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
    ///
    /// For models whose inputs and outputs are tensors; a model with sequence or
    /// optional inputs or outputs needs [`Session::run_values`] (a tensor given for
    /// an optional tensor input is accepted as present).
    pub fn run(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        tensor_outputs(self.run_with(tensor_feeds(inputs), None)?)
    }

    /// Runs the model on values of any kind (tensors, sequences, optionals).
    /// Every required input must be given by name; returns every graph output,
    /// in order.
    pub fn run_values(&self, inputs: Vec<(String, Value)>) -> Result<Vec<(String, Value)>> {
        self.run_with(inputs, None)
    }

    /// [`Session::run`], also timing every top-level node (in execution order).
    pub fn run_profiled(
        &self,
        inputs: Vec<(String, Tensor)>,
    ) -> Result<(Vec<(String, Tensor)>, Vec<NodeTiming>)> {
        let mut timings = Vec::with_capacity(self.plan.steps.len());
        let outs = tensor_outputs(self.run_with(tensor_feeds(inputs), Some(&mut timings))?)?;
        Ok((outs, timings))
    }

    /// [`Session::run_values`], also timing every top-level node.
    pub fn run_values_profiled(
        &self,
        inputs: Vec<(String, Value)>,
    ) -> Result<(Vec<(String, Value)>, Vec<NodeTiming>)> {
        let mut timings = Vec::with_capacity(self.plan.steps.len());
        let outs = self.run_with(inputs, Some(&mut timings))?;
        Ok((outs, timings))
    }

    /// Checks the inputs and runs the plan in this session's pool.
    fn run_with(
        &self,
        inputs: Vec<(String, Value)>,
        profile: Option<&mut Vec<NodeTiming>>,
    ) -> Result<Vec<(String, Value)>> {
        let feeds = self.check_inputs(inputs).map_err(|e| match e {
            Error::Input(msg) if !self.fixed.is_empty() => Error::Input(format!(
                "{msg} (dims fixed at load: {})",
                fixed_text(&self.fixed)
            )),
            e => e,
        })?;
        let outs = crate::pool::install_warm(&self.pool, || {
            execute_profiled(&self.plan, feeds, &[], profile)
        })?;
        Ok(self
            .plan
            .outputs
            .iter()
            .zip(outs)
            .map(|((name, _), v)| (name.clone(), v.into_value()))
            .collect())
    }

    /// Validates names, kinds, dtypes and shapes of the caller's inputs (binding
    /// symbolic dims consistently across inputs) and maps them to plan slots.
    fn check_inputs(&self, given: Vec<(String, Value)>) -> Result<Vec<(usize, Val)>> {
        let mut bindings: Bindings = HashMap::new();
        let mut feeds = Vec::with_capacity(given.len());
        let mut seen = HashSet::new();
        for (name, value) in given {
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
            let value = conform(info, &info.kind, value, &mut bindings, true)?;
            feeds.push((self.plan.inputs[pos].1, Val::from_value(value)));
        }
        if let Some(missing) = self
            .inputs
            .iter()
            .find(|i| !i.has_default && !seen.contains(&i.name))
        {
            return Err(Error::Input(format!(
                "missing input '{}' ({})",
                missing.name,
                missing.type_string()
            )));
        }
        Ok(feeds)
    }
}

fn tensor_feeds(inputs: Vec<(String, Tensor)>) -> Vec<(String, Value)> {
    inputs
        .into_iter()
        .map(|(n, t)| (n, Value::Tensor(t)))
        .collect()
}

/// The outputs as tensors; a sequence or optional output is an error naming it.
fn tensor_outputs(outs: Vec<(String, Value)>) -> Result<Vec<(String, Tensor)>> {
    outs.into_iter()
        .map(|(name, v)| match v {
            Value::Tensor(t) => Ok((name, t)),
            other => Err(Error::Input(format!(
                "output '{name}' is not a tensor ({}): use Session::run_values",
                other.describe()
            ))),
        })
        .collect()
}

/// Symbolic dims bound so far: symbol -> (value, the input that bound it).
type Bindings = HashMap<String, (usize, String)>;

/// Checks `value` against the input's type at nesting level `kind`. A plain
/// value given for an optional input becomes a present optional. Symbolic dims
/// are bound (`bind`) for tensors, not for sequence elements (whose shapes may
/// differ from one element to the next).
fn conform(
    info: &IoInfo,
    kind: &ValueKind,
    value: Value,
    bindings: &mut Bindings,
    bind: bool,
) -> Result<Value> {
    let name = &info.name;
    match (kind, value) {
        (ValueKind::Tensor, Value::Tensor(t)) => {
            check_tensor(info, name, &t, bindings, bind)?;
            Ok(Value::Tensor(t))
        }
        (ValueKind::Sequence(inner), Value::Sequence { dtype, tensors })
            if **inner == ValueKind::Tensor =>
        {
            if dtype != info.dtype {
                return Err(Error::Input(format!(
                    "input '{name}' must be a sequence of {} tensors but a sequence of {dtype} tensors was given",
                    info.dtype
                )));
            }
            for (k, t) in tensors.iter().enumerate() {
                check_tensor(info, &format!("{name}[{k}]"), t, bindings, false)?;
            }
            Ok(Value::Sequence { dtype, tensors })
        }
        (ValueKind::Optional(_), Value::Optional(None)) => Ok(Value::Optional(None)),
        (ValueKind::Optional(inner), Value::Optional(Some(v))) => Ok(Value::Optional(Some(
            Box::new(conform(info, inner, *v, bindings, bind)?),
        ))),
        (ValueKind::Optional(inner), v) if !matches!(v, Value::Optional(_)) => Ok(Value::Optional(
            Some(Box::new(conform(info, inner, v, bindings, bind)?)),
        )),
        (_, v) => Err(Error::Input(format!(
            "input '{name}' must be {} but a {} was given{}",
            info.type_string(),
            v.describe(),
            if v.as_tensor().is_some() {
                " (Session::run_values takes sequences and optionals)"
            } else {
                ""
            }
        ))),
    }
}

/// Dtype and shape of one tensor (`what`: the input, or `input[k]` for a
/// sequence element) against the input's declared element type.
fn check_tensor(
    info: &IoInfo,
    what: &str,
    tensor: &Tensor,
    bindings: &mut Bindings,
    bind: bool,
) -> Result<()> {
    if tensor.dtype() != info.dtype {
        return Err(Error::Input(format!(
            "input '{what}' must be {} but {} was given",
            info.dtype,
            tensor.dtype()
        )));
    }
    let Some(shape) = &info.shape else {
        return Ok(());
    };
    let mismatch = || {
        Error::Input(format!(
            "input '{what}' must have shape {} but {:?} was given",
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
            Dim::Named(sym) if bind => match bindings.get(sym) {
                Some((bound, by)) if *bound != actual => {
                    let other = if by == what {
                        "another of its dims has".to_string()
                    } else {
                        format!("input '{by}' has")
                    };
                    return Err(Error::Input(format!(
                        "input '{what}' has {sym}={actual} but {other} {sym}={bound}"
                    )));
                }
                Some(_) => {}
                None => {
                    bindings.insert(sym.clone(), (actual, what.to_string()));
                }
            },
            _ => {}
        }
    }
    Ok(())
}
