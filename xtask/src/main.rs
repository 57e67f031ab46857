//! `cargo xtask <command>`: developer chores that need more than cargo.
//!
//! - `test`: the whole test suite. Creates the Python venv with the oracle
//!   (onnxruntime) and the test-model builder (onnx, numpy) if missing, runs the
//!   Rust tests, builds the test models and compares kiln with ONNX Runtime on
//!   them, then checks that malformed models fail cleanly.
//! - `venv`: only create/update the venv and print its path.
//! - `models [NAME...]`: build the generated test models.
//! - `conformance [ARGS...]`: the ONNX backend test suite through `kiln run`
//!   (`scripts/conformance.py`; e.g. `--ort --report docs/conformance.md`).
//! - `bench-compare [--models a,b] [--threads N] [--rounds 3] [--batch 1,8] [ARGS...]`:
//!   kiln vs ONNX Runtime vs OpenVINO (installed into the venv on demand) on the
//!   generated models, same inputs, alternating runs; prints a table and writes
//!   `docs/bench.md` (`scripts/bench_compare.py`).
//!
//! The venv, the generated models and (under CI) the cargo target folder live in
//! `$KILN_CACHE` (default `~/.cache/kiln`), outside the clone, so warm runs are fast.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Pinned so the oracle and the test models are the same everywhere.
const PY_PACKAGES: &[&str] = &[
    "onnx==1.23.2",
    "onnxruntime==1.32.0",
    "numpy==2.4.6",
    // The official Triton/KServe client, for the `kiln serve` end-to-end tests.
    "tritonclient[http,grpc]==2.73.0",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("venv") => venv().map(|p| println!("{}", p.display())),
        Some("models") => venv().and_then(|py| models(&py, &args[1..])),
        Some("conformance") => conformance(&args[1..]),
        Some("bench-compare") => bench_compare(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <test [--quick] | venv | models [NAME...] | conformance [ARGS...] | bench-compare [ARGS...]>");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cache() -> PathBuf {
    if let Ok(c) = std::env::var("KILN_CACHE") {
        return PathBuf::from(c);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    Path::new(&home).join(".cache").join("kiln")
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

/// Ensures the venv exists with the pinned packages; returns its python.
fn venv() -> Result<PathBuf, String> {
    let dir = cache().join("venv");
    let python = dir.join("bin").join("python");
    let stamp = dir.join("kiln-packages.txt");
    let wanted = PY_PACKAGES.join("\n");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(python);
    }
    std::fs::create_dir_all(cache()).map_err(|e| e.to_string())?;
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    }
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PY_PACKAGES))?;
    std::fs::write(&stamp, wanted).map_err(|e| e.to_string())?;
    Ok(python)
}

fn models(python: &Path, names: &[String]) -> Result<(), String> {
    let mut cmd = Command::new(python);
    cmd.arg("scripts/make_models.py")
        .arg(cache().join("models"));
    if !names.is_empty() {
        cmd.arg("--only").args(names);
    }
    run(&mut cmd)
}

fn kiln_binary() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target"));
    target.join("release").join("kiln")
}

fn conformance(args: &[String]) -> Result<(), String> {
    let python = venv()?;
    run(Command::new("cargo").args(["build", "--release", "-p", "kiln-cli"]))?;
    run(Command::new(&python)
        .arg("scripts/conformance.py")
        .arg("--kiln")
        .arg(kiln_binary())
        .args(args))
}

/// OpenVINO for `bench-compare` only (not needed by the tests, so not in
/// PY_PACKAGES); numpy stays at the pinned version.
const OPENVINO_PACKAGES: &[&str] = &["openvino==2026.4.1", "numpy==2.4.6"];

/// The default models of `bench-compare` (`scripts/bench_compare.py` has the same).
const BENCH_MODELS: &[&str] = &["resnet50", "mobilenetv2", "bert_base", "gpt2_small"];

fn bench_compare(args: &[String]) -> Result<(), String> {
    let python = venv()?;
    let has_openvino = Command::new(&python)
        .args(["-c", "import openvino"])
        .current_dir(root())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_openvino && !args.iter().any(|a| a == "--no-openvino") {
        let install = run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(OPENVINO_PACKAGES));
        if let Err(e) = install {
            // The comparison still runs, without the OpenVINO column.
            eprintln!(
                "xtask: OpenVINO could not be installed ({e}); comparing with ONNX Runtime only"
            );
        }
    }
    run(Command::new("cargo").args(["build", "--release", "-p", "kiln-cli"]))?;
    // The models named by --models (NAME,NAME or --models=NAME,NAME), else the defaults.
    let mut names: Vec<String> = BENCH_MODELS.iter().map(|s| s.to_string()).collect();
    for (i, a) in args.iter().enumerate() {
        let list = match a.strip_prefix("--models=") {
            Some(v) => Some(v.to_string()),
            None if a == "--models" => args.get(i + 1).cloned(),
            None => None,
        };
        if let Some(list) = list {
            names = list
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
        }
    }
    models(&python, &names)?;
    let mut cmd = Command::new(&python);
    cmd.arg("scripts/bench_compare.py")
        .arg("--kiln")
        .arg(kiln_binary())
        .arg("--models-dir")
        .arg(cache().join("models"));
    if !args
        .iter()
        .any(|a| a == "--report" || a.starts_with("--report="))
    {
        cmd.args(["--report", "docs/bench.md"]);
    }
    run(cmd.args(args))
}

fn test(args: &[String]) -> Result<(), String> {
    let quick = args.iter().any(|a| a == "--quick");
    // Every kiln the tests start tunes its convs (tune.rs) while the tests
    // load the machine: those choices go to a file of their own, not the
    // user's cache that later runs would take them from. (Set before any
    // child starts; xtask runs no other threads.)
    std::env::set_var("KILN_TUNE_CACHE", cache().join("tuning-tests.json"));
    let python = venv()?;
    run(Command::new("cargo").args(["test", "--release", "--workspace"]))?;
    run(Command::new("cargo").args(["build", "--release", "-p", "kiln-cli"]))?;
    let kiln = kiln_binary();
    run(Command::new(&python)
        .arg("scripts/test_cli_errors.py")
        .arg("--kiln")
        .arg(&kiln))?;
    // The ONNX backend suite, gated on the committed baseline: a case that passed
    // there and fails now is a regression.
    run(Command::new(&python)
        .arg("scripts/conformance.py")
        .arg("--kiln")
        .arg(&kiln)
        .args([
            "--exclude-random",
            "--baseline",
            "docs/conformance-baseline.json",
        ]))?;
    let mut only: Vec<&str> = Vec::new();
    if quick {
        only.extend(["tiny_cnn", "mobilenetv3_small_ish", "lstm_if", "mixed_ops"]);
    }
    models(
        &python,
        &only.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )?;
    let mut cmp = Command::new(&python);
    cmp.arg("scripts/compare_with_ort.py")
        .arg("--kiln")
        .arg(&kiln)
        .arg("--models-dir")
        .arg(cache().join("models"));
    if !only.is_empty() {
        cmp.arg("--only").args(&only);
    }
    run(&mut cmp)?;
    // `kiln serve` end to end with tritonclient (HTTP, gRPC), bad input, load, SIGTERM.
    // The short load test: the long one is a benchmark (docs/serving.md).
    run(Command::new(&python)
        .arg("scripts/test_serve.py")
        .arg("--kiln")
        .arg(&kiln)
        .arg("--quick"))?;
    // Real published models shipped inside PyPI wheels (PP-OCR, YOLOv8n, Silero VAD, MiniLM).
    run(Command::new(&python)
        .arg("scripts/real_models.py")
        .arg("--kiln")
        .arg(&kiln))?;
    Ok(())
}
