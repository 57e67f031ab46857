//! `kiln run`: bind inputs (files or random), run, print and save outputs.

use crate::{npy, Failure};
use clap::{Args, ValueEnum};
use half::{bf16, f16};
use kiln_ir::{DType, Dim, Tensor, TensorData, ValueKind};
use kiln_runtime::{IoInfo, Session, SessionOptions, Value};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// `DIR/<name>.npy` per tensor output; a sequence output writes one
    /// `DIR/<name>_<k>.npy` per element (none when empty); an optional output
    /// writes its content, or nothing when empty.
    Npy,
    /// `DIR/output_<i>.pb`: a TensorProto, or a SequenceProto / OptionalProto
    /// for sequence / optional outputs (the layout of the ONNX test data).
    Pb,
}

#[derive(Args)]
pub struct RunArgs {
    /// The ONNX model file.
    pub model: PathBuf,
    /// An input as `[NAME=]PATH` (.npy, or a .pb holding a TensorProto, or a
    /// SequenceProto / OptionalProto for a sequence / optional input, as the
    /// model declares it). Inputs without a name bind to the model's inputs in
    /// order. Repeat for several inputs.
    #[arg(long = "input", short = 'i', value_name = "[NAME=]PATH")]
    pub inputs: Vec<String>,
    /// Value of a symbolic dimension, as NAME=VALUE: fixed at load, so the
    /// plan is compiled for it (as ONNX Runtime's free dimension overrides);
    /// inputs given with --input must then have it. Random inputs use it
    /// (other symbolic dims there: 1).
    #[arg(long = "dim", value_name = "NAME=VALUE")]
    pub dims: Vec<String>,
    /// Write every output into this folder.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// File format for --output-dir.
    #[arg(long, value_enum, default_value_t = OutputFormat::Npy)]
    pub output_format: OutputFormat,
    /// Seed for random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How many values of each output to print.
    #[arg(long, default_value_t = 8)]
    pub show: usize,
    /// Also print where the run's time went: per op type and the slowest
    /// nodes, with GFLOP/s or GB/s against this machine's roofline (one run;
    /// `kiln bench --profile` averages many).
    #[arg(long)]
    pub profile: bool,
    /// With --profile: how many of the slowest nodes to list.
    #[arg(long, default_value_t = 15)]
    pub top: usize,
}

pub fn run(args: RunArgs) -> Result<(), Failure> {
    let dims = parse_dims(&args.dims)?;
    let t0 = Instant::now();
    let options = SessionOptions {
        fixed_dims: dims.clone(),
        ..SessionOptions::default()
    };
    let session = Session::load(&args.model, &options)?;
    warn_unused_dims(&session, &dims);
    let load_time = t0.elapsed();

    let random = args.inputs.is_empty();
    let inputs = if random {
        random_inputs(session.inputs(), &dims, args.seed, &[])?
            .into_iter()
            .map(|(n, t)| (n, Value::Tensor(t)))
            .collect()
    } else {
        file_inputs(session.inputs(), &args.inputs)?
    };
    let t1 = Instant::now();
    let (outputs, timings) = if args.profile {
        let (o, t) = session.run_values_profiled(inputs)?;
        (o, Some(t))
    } else {
        (session.run_values(inputs)?, None)
    };
    let run_time = t1.elapsed();

    for (name, v) in &outputs {
        print_value(name, v, args.show);
    }
    if random {
        println!(
            "ran on random inputs: load {:.1} ms, run {:.1} ms",
            load_time.as_secs_f64() * 1e3,
            run_time.as_secs_f64() * 1e3
        );
    }
    if let Some(timings) = timings {
        crate::bench::print_profile(&session, &timings, args.top, run_time.as_secs_f64());
    }
    if let Some(dir) = &args.output_dir {
        write_outputs(dir, args.output_format, &outputs)?;
    }
    Ok(())
}

pub(crate) fn parse_dims(specs: &[String]) -> Result<Vec<(String, usize)>, Failure> {
    let mut dims: Vec<(String, usize)> = Vec::with_capacity(specs.len());
    for s in specs {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| Failure::usage(format!("--dim '{s}' must be NAME=VALUE")))?;
        let value = value.parse::<usize>().map_err(|_| {
            Failure::usage(format!(
                "--dim '{s}': '{value}' is not a non-negative integer"
            ))
        })?;
        if dims.iter().any(|(n, _)| n == name) {
            return Err(Failure::usage(format!("--dim {name} is given twice")));
        }
        dims.push((name.to_string(), value));
    }
    Ok(dims)
}

/// Warns about `--dim` names that no input of the session's model fixed
/// (a typo benchmarks the model with that dim left symbolic).
pub(crate) fn warn_unused_dims(session: &Session, dims: &[(String, usize)]) {
    for (name, _) in dims {
        if !session.fixed_dims().iter().any(|(n, _)| n == name) {
            eprintln!(
                "warning: --dim {name}: no tensor input of the model (without a default) has a dim named '{name}'"
            );
        }
    }
}

fn print_value(name: &str, v: &Value, show: usize) {
    match v {
        Value::Tensor(t) => println!(
            "{name}: {} {:?} = {}",
            t.dtype(),
            t.shape(),
            preview(t, show)
        ),
        Value::Sequence { dtype, tensors } => {
            println!("{name}: sequence of {} {dtype} tensors", tensors.len());
            for (k, t) in tensors.iter().enumerate() {
                print_value(&format!("  {name}[{k}]"), &Value::Tensor(t.clone()), show);
            }
        }
        Value::Optional(None) => println!("{name}: empty optional"),
        Value::Optional(Some(inner)) => print_value(&format!("{name} (optional)"), inner, show),
    }
}

/// Reads an input file for `info` (when known): `.npy` (a tensor), or a `.pb`
/// decoded as the input's declared kind (TensorProto, SequenceProto or
/// OptionalProto; TensorProto when the input is not known).
fn read_value_file(path: &Path, info: Option<&IoInfo>) -> Result<Value, Failure> {
    let bytes = std::fs::read(path)
        .map_err(|e| Failure::error(format!("cannot read {}: {e}", path.display())))?;
    let is_npy = bytes.starts_with(b"\x93NUMPY");
    let kind = info.map(|i| i.kind.clone()).unwrap_or_default();
    let parsed = if is_npy {
        if matches!(kind, ValueKind::Sequence(_)) {
            Err(format!(
                "input '{}' is a sequence ({}); give it as a SequenceProto .pb file",
                info.map(|i| i.name.as_str()).unwrap_or("?"),
                info.map(|i| i.type_string()).unwrap_or_default()
            ))
        } else {
            npy::read(&bytes).map(Value::Tensor)
        }
    } else {
        let dtype = info.map(|i| i.dtype).unwrap_or(DType::F32);
        match kind {
            ValueKind::Tensor => kiln_onnx::read_tensor_pb(&bytes)
                .map(Value::Tensor)
                .map_err(|e| format!("not a .npy file, and {e}")),
            kind => kiln_runtime::read_value_pb(&bytes, &kind, dtype).map_err(|e| {
                let e = e.to_string();
                e.strip_prefix("bad input: ").unwrap_or(&e).to_string()
            }),
        }
    };
    parsed.map_err(|e| Failure::error(format!("{}: {e}", path.display())))
}

/// Binds `[NAME=]PATH` specs to the model's inputs (unnamed ones to the inputs
/// without defaults first, in order) and reads each file as its input's kind.
pub(crate) fn file_inputs(
    infos: &[IoInfo],
    specs: &[String],
) -> Result<Vec<(String, Value)>, Failure> {
    let mut positional = infos
        .iter()
        .filter(|i| !i.has_default)
        .chain(infos.iter().filter(|i| i.has_default));
    let mut out = Vec::new();
    for spec in specs {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) if !n.is_empty() && !Path::new(spec).exists() => {
                (n.to_string(), p.to_string())
            }
            _ => {
                let info = positional.next().ok_or_else(|| {
                    Failure::usage(format!(
                        "too many inputs: the model takes {} ({spec} is extra)",
                        infos.len()
                    ))
                })?;
                (info.name.clone(), spec.clone())
            }
        };
        let Some(info) = infos.iter().find(|i| i.name == name) else {
            // A bad input, not a bad command line: exit 1 like the runtime's
            // own input errors.
            return Err(Failure::error(format!(
                "the model has no input '{name}' (it has: {})",
                infos
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        out.push((name, read_value_file(Path::new(&path), Some(info))?));
    }
    Ok(out)
}

/// Largest random input kiln makes (elements): guards against absurd declared dims.
const MAX_RANDOM_ELEMENTS: usize = 1 << 28;

/// Random tensors (seeded) for the required inputs not named in `given`.
pub(crate) fn random_inputs(
    infos: &[IoInfo],
    dims: &[(String, usize)],
    seed: u64,
    given: &[String],
) -> Result<Vec<(String, Tensor)>, Failure> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    infos
        .iter()
        .filter(|i| !i.has_default && !given.contains(&i.name))
        .map(|info| Ok((info.name.clone(), random_tensor(info, dims, &mut rng)?)))
        .collect()
}

/// A random tensor for `info`: floats in [0, 1); integers 0 or 1, so that they
/// are valid token ids, indices, token types and attention masks for most
/// models; booleans either way. Symbolic dims come from `dims`, else 1.
pub(crate) fn random_tensor(
    info: &IoInfo,
    dims: &[(String, usize)],
    rng: &mut rand::rngs::StdRng,
) -> Result<Tensor, Failure> {
    if info.kind != ValueKind::Tensor {
        return Err(Failure::usage(format!(
            "input '{}' is a {}, not a tensor: kiln makes random tensors only; give it with --input",
            info.name,
            info.type_string()
        )));
    }
    let shape: Vec<usize> = info
        .shape
        .as_ref()
        .ok_or_else(|| {
            Failure::usage(format!(
                "input '{}' has unknown rank; give it with --input",
                info.name
            ))
        })?
        .iter()
        .map(|d| match d {
            Dim::Known(v) => *v,
            Dim::Named(n) => dims
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| *v)
                .unwrap_or(1),
            _ => 1,
        })
        .collect();
    let n = kiln_ir::checked_numel(&shape)
        .filter(|&n| n <= MAX_RANDOM_ELEMENTS)
        .ok_or_else(|| {
            Failure::error(format!(
                "input '{}' would have shape {shape:?}, too large for a random input; give it with --input",
                info.name
            ))
        })?;
    let data = match info.dtype {
        DType::F32 => TensorData::F32((0..n).map(|_| rng.gen::<f32>()).collect()),
        DType::F64 => TensorData::F64((0..n).map(|_| rng.gen::<f64>()).collect()),
        DType::F16 => TensorData::F16((0..n).map(|_| f16::from_f32(rng.gen())).collect()),
        DType::BF16 => TensorData::BF16((0..n).map(|_| bf16::from_f32(rng.gen())).collect()),
        DType::Bool => TensorData::Bool((0..n).map(|_| rng.gen()).collect()),
        DType::String => TensorData::String((0..n).map(|i| format!("s{i}")).collect()),
        int => {
            let v: Vec<i64> = (0..n).map(|_| rng.gen_range(0..2)).collect();
            let t =
                Tensor::from_vec(shape.clone(), v).map_err(|e| Failure::error(e.to_string()))?;
            cast_int(&t, int).map_err(|f| {
                Failure::usage(format!(
                    "input '{}': {}; give it with --input",
                    info.name, f.message
                ))
            })?
        }
    };
    Tensor::new(shape, data).map_err(|e| Failure::error(e.to_string()))
}

fn cast_int(t: &Tensor, to: DType) -> Result<TensorData, Failure> {
    let v = t.as_slice::<i64>().unwrap_or(&[]);
    Ok(match to {
        DType::I8 => TensorData::I8(v.iter().map(|&x| x as i8).collect()),
        DType::I16 => TensorData::I16(v.iter().map(|&x| x as i16).collect()),
        DType::I32 => TensorData::I32(v.iter().map(|&x| x as i32).collect()),
        DType::I64 => TensorData::I64(v.to_vec()),
        DType::U8 => TensorData::U8(v.iter().map(|&x| x as u8).collect()),
        DType::U16 => TensorData::U16(v.iter().map(|&x| x as u16).collect()),
        DType::U32 => TensorData::U32(v.iter().map(|&x| x as u32).collect()),
        DType::U64 => TensorData::U64(v.iter().map(|&x| x as u64).collect()),
        other => return Err(Failure::error(format!("cannot make random {other} values"))),
    })
}

fn preview(t: &Tensor, n: usize) -> String {
    let items: Vec<String> =
        kiln_ir::with_data!(t.data(), v => v.iter().take(n).map(|x| format!("{x:?}")).collect());
    let more = if t.len() > n { ", ..." } else { "" };
    format!("[{}{more}]", items.join(", "))
}

/// Output names become file names: characters outside `[A-Za-z0-9._-]` become `_`.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write_outputs(
    dir: &Path,
    format: OutputFormat,
    outputs: &[(String, Value)],
) -> Result<(), Failure> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::error(format!("cannot create {}: {e}", dir.display())))?;
    for (i, (name, v)) in outputs.iter().enumerate() {
        let files: Vec<(PathBuf, Vec<u8>)> = match format {
            OutputFormat::Npy => npy_files(dir, &sanitize(name), v),
            OutputFormat::Pb => vec![(
                dir.join(format!("output_{i}.pb")),
                kiln_runtime::write_value_pb(v, name),
            )],
        };
        for (path, bytes) in files {
            std::fs::write(&path, bytes)
                .map_err(|e| Failure::error(format!("cannot write {}: {e}", path.display())))?;
        }
    }
    Ok(())
}

/// The `.npy` files of one output: `<stem>.npy` for a tensor, `<stem>_<k>.npy`
/// per sequence element, an optional's content (nothing when empty).
fn npy_files(dir: &Path, stem: &str, v: &Value) -> Vec<(PathBuf, Vec<u8>)> {
    match v {
        Value::Tensor(t) => vec![(dir.join(format!("{stem}.npy")), npy::write(t))],
        Value::Sequence { tensors, .. } => tensors
            .iter()
            .enumerate()
            .map(|(k, t)| (dir.join(format!("{stem}_{k}.npy")), npy::write(t)))
            .collect(),
        Value::Optional(None) => Vec::new(),
        Value::Optional(Some(inner)) => npy_files(dir, stem, inner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_names() {
        assert_eq!(super::sanitize("logits"), "logits");
        assert_eq!(super::sanitize("out:0/a b"), "out_0_a_b");
    }

    #[test]
    fn npy_files_per_sequence_element_and_optional_content() {
        let dir = Path::new("/out");
        let seq = Value::sequence(
            DType::F32,
            vec![Tensor::vector(vec![1.0f32]), Tensor::vector(vec![2.0f32])],
        )
        .unwrap();
        let names: Vec<PathBuf> = npy_files(dir, "s", &seq).into_iter().map(|f| f.0).collect();
        assert_eq!(names, vec![dir.join("s_0.npy"), dir.join("s_1.npy")]);
        assert!(npy_files(dir, "o", &Value::Optional(None)).is_empty());
        let opt = Value::Optional(Some(Box::new(Value::Tensor(Tensor::scalar(1i64)))));
        assert_eq!(npy_files(dir, "o", &opt)[0].0, dir.join("o.npy"));
    }
}
