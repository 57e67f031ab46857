#!/usr/bin/env python3
"""kiln against ONNX Runtime and OpenVINO, side by side, on the same inputs.

For every model and batch size this script
  1. makes seeded inputs that fit the model (compare_with_ort.make_inputs:
     token ids inside the vocabulary, a realistic attention mask, ...) and
     saves them as .npy,
  2. checks that kiln and ONNX Runtime agree on them (`kiln run` output vs
     ORT output: max abs diff, and max abs diff over max |ORT|),
  3. times each runtime in its own process, alternating A B C A B C for
     --rounds rounds, each run doing the same --warmup and --iterations
     (bounded by --max-seconds per run), each compiling the model for the
     inputs' sizes of its symbolic dims:
       kiln      `kiln bench MODEL --json --threads T -i NAME=FILE ...
                 --dim NAME=SIZE ...`
       ORT       this script's `--runner ort`: all graph optimizations,
                 intra_op_num_threads=T, inter_op_num_threads=1, sequential,
                 free dimension overrides for the symbolic dims
       OpenVINO  this script's `--runner openvino` (when the openvino package
                 imports): CPU, INFERENCE_NUM_THREADS=T, precision hint f32,
                 LATENCY performance hint, shapes made static first
     each reporting every timed latency and its own peak RSS (VmHWM),
  4. prints a table: the median latency of each runtime over all its timed
     runs, kiln / fastest peer, peak RSS of each, and the agreement check,
     and with --report writes it (with `kiln hw --json` machine info) as
     Markdown.

Usage:
    bench_compare.py --kiln PATH --models-dir DIR [--models a,b] [--threads N]
                     [--rounds 3] [--batch 1,8] [--iterations 20] [--warmup 3]
                     [--max-seconds 30] [--report docs/bench.md] [--json FILE]
    bench_compare.py --runner {ort,openvino} --model M --inputs DIR --threads N
                     --iterations N --warmup N --max-seconds S [--save-outputs DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_MODELS = ["resnet50", "mobilenetv2", "bert_base", "gpt2_small"]
# The symbolic batch dim of each generated model's inputs.
BATCH_DIMS = ("N", "B", "batch", "batch_size")
OPENVINO_VERSION = "2026.4.1"  # the version xtask installs; for the report only


# --------------------------------------------------------------------------
# Runners (run in their own process so each one's peak RSS is its own)
# --------------------------------------------------------------------------


def peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # noqa: BLE001 - unknown is an honest answer
        return None


def load_inputs(d: Path) -> dict[str, np.ndarray]:
    manifest = json.loads((d / "inputs.json").read_text())
    return {name: np.load(d / file, allow_pickle=False) for name, file in manifest.items()}


def timed_loop(run, warmup: int, iterations: int, max_seconds: float) -> tuple[list[float], int]:
    """Same policy as `kiln bench`: warmup, then timed runs, no new run after
    max_seconds (at least one timed run)."""
    deadline = time.perf_counter() + max_seconds
    warmed = 0
    while warmed < warmup and time.perf_counter() < deadline:
        run()
        warmed += 1
    lat = []
    for i in range(iterations):
        t = time.perf_counter()
        run()
        lat.append((time.perf_counter() - t) * 1e3)
        if i + 1 < iterations and time.perf_counter() >= deadline:
            break
    return lat, warmed


def fixed_dims(d: Path) -> dict[str, int]:
    """The symbolic input dims and their sizes in these inputs (written by
    bench_case): every runtime compiles for those shapes."""
    f = d / "dims.json"
    return json.loads(f.read_text()) if f.exists() else {}


def runner_ort(args) -> dict:
    import onnxruntime as ort
    feeds = load_inputs(Path(args.inputs))
    t0 = time.perf_counter()
    so = ort.SessionOptions()
    # Static shapes, as kiln (--dim) and OpenVINO (reshape) get them.
    for name, size in fixed_dims(Path(args.inputs)).items():
        so.add_free_dimension_override_by_name(name, size)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1e3
    if args.save_outputs:
        out = Path(args.save_outputs)
        out.mkdir(parents=True, exist_ok=True)
        names = [o.name for o in sess.get_outputs()]
        for i, arr in enumerate(sess.run(None, feeds)):
            np.save(out / f"{i}.npy", arr)
        (out / "outputs.json").write_text(json.dumps(names))
    lat, warmed = timed_loop(lambda: sess.run(None, feeds), args.warmup, args.iterations,
                             args.max_seconds)
    return {"runtime": "onnxruntime", "version": ort.__version__, "load_ms": load_ms,
            "warmup": warmed, "latencies_ms": lat, "peak_rss_bytes": peak_rss_bytes()}


def runner_openvino(args) -> dict:
    import openvino as ov
    feeds = load_inputs(Path(args.inputs))
    t0 = time.perf_counter()
    core = ov.Core()
    model = core.read_model(args.model)
    # Static shapes, the ones of these inputs: what a latency benchmark of
    # one input size compiles for (kiln and ORT get the same sizes for the
    # models' symbolic dims).
    model.reshape({name: ov.PartialShape(list(a.shape)) for name, a in feeds.items()})
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": args.threads,
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
    })
    req = compiled.create_infer_request()
    load_ms = (time.perf_counter() - t0) * 1e3
    lat, warmed = timed_loop(lambda: req.infer(feeds), args.warmup, args.iterations,
                             args.max_seconds)
    return {"runtime": "openvino", "version": ov.__version__, "load_ms": load_ms,
            "warmup": warmed, "latencies_ms": lat, "peak_rss_bytes": peak_rss_bytes()}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


class InputInfo:
    """What compare_with_ort.make_inputs reads from an ORT input, from the graph."""

    TYPES = {1: "tensor(float)", 11: "tensor(double)", 10: "tensor(float16)", 7: "tensor(int64)",
             6: "tensor(int32)", 3: "tensor(int8)", 2: "tensor(uint8)", 9: "tensor(bool)"}

    def __init__(self, vi):
        self.name = vi.name
        tt = vi.type.tensor_type
        self.type = self.TYPES.get(tt.elem_type, f"elem_type {tt.elem_type}")
        self.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in tt.shape.dim]


class GraphInputs:
    def __init__(self, model):
        inits = {t.name for t in model.graph.initializer}
        self._inputs = [InputInfo(i) for i in model.graph.input if i.name not in inits]

    def get_inputs(self):
        return self._inputs


def run_json(cmd: list[str], timeout: float) -> tuple[dict | None, str]:
    """Runs cmd, which prints one JSON object; returns (object, error text)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f}s"
    except OSError as e:
        return None, f"cannot start: {e}"
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return None, f"exit {p.returncode}: {tail}"
    try:
        return json.loads(p.stdout), ""
    except json.JSONDecodeError as e:
        return None, f"bad JSON ({e}): {p.stdout[:200]!r}"


def have_openvino() -> bool:
    try:
        import openvino  # noqa: F401
        return True
    except ImportError:
        return False


def agreement(kiln: Path, model: Path, in_dir: Path, work: Path, threads: int,
              timeout: float) -> dict:
    """kiln `run` vs ORT on the same inputs: worst output's max abs diff and
    max abs diff / max |ORT| (a normwise relative error)."""
    import compare_with_ort as cwo
    ort_dir, kiln_dir = work / "ort_out", work / "kiln_out"
    res, err = run_json([sys.executable, __file__, "--runner", "ort", "--model", str(model),
                         "--inputs", str(in_dir), "--threads", str(threads), "--iterations", "1",
                         "--warmup", "0", "--max-seconds", "1", "--save-outputs", str(ort_dir)],
                        timeout)
    if res is None:
        return {"ok": False, "error": f"onnxruntime: {err}"}
    manifest = json.loads((in_dir / "inputs.json").read_text())
    cmd = [str(kiln), "run", str(model), "--output-dir", str(kiln_dir), "--show", "0"]
    for name, file in manifest.items():
        cmd += ["--input", f"{name}={in_dir / file}"]
    for name, size in fixed_dims(in_dir).items():
        cmd += ["--dim", f"{name}={size}"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"kiln run timed out after {timeout:.0f}s"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"ok": False, "error": f"kiln run exit {p.returncode}: {tail}"}
    names = json.loads((ort_dir / "outputs.json").read_text())
    worst_abs, worst_rel = 0.0, 0.0
    for i, name in enumerate(names):
        ref = np.load(ort_dir / f"{i}.npy")
        f = kiln_dir / f"{cwo.sanitize(name)}.npy"
        if not f.exists():
            return {"ok": False, "error": f"kiln wrote no output {name!r}"}
        got = np.load(f)
        if got.shape != ref.shape:
            return {"ok": False, "error": f"output {name!r}: shape {got.shape} vs {ref.shape}"}
        if ref.size == 0:
            continue
        d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        if not np.all(np.isfinite(d)):
            return {"ok": False, "error": f"output {name!r}: non-finite difference"}
        a = float(d.max())
        scale = float(np.abs(ref.astype(np.float64)).max())
        worst_abs = max(worst_abs, a)
        worst_rel = max(worst_rel, a / scale if scale > 0 else (0.0 if a == 0 else float("inf")))
    ok = worst_abs <= cwo.ATOL or worst_rel <= 1e-3
    return {"ok": ok, "max_abs": worst_abs, "max_rel": worst_rel}


def bench_case(name: str, path: Path, batch: int, args, work: Path, log) -> dict:
    import onnx
    import compare_with_ort as cwo
    import make_models
    model = onnx.load(str(path), load_external_data=False)
    dims = dict(make_models.MODELS[name].test_dims) if name in make_models.MODELS else {}
    gi = GraphInputs(model)
    batch_dim = None
    for inp in gi.get_inputs():
        if inp.shape and isinstance(inp.shape[0], str) and inp.shape[0] in BATCH_DIMS:
            batch_dim = inp.shape[0]
            break
    if batch != 1 and batch_dim is None:
        return {"model": name, "batch": batch, "skipped": "no symbolic batch dim"}
    if batch_dim:
        dims[batch_dim] = batch
    feeds = cwo.make_inputs(gi, model, dims, args.seed)
    del model
    in_dir = work / f"{name}_b{batch}" / "inputs"
    in_dir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for k, (iname, arr) in enumerate(feeds.items()):
        file = f"{k}_{cwo.sanitize(iname)}.npy"
        np.save(in_dir / file, arr)
        manifest[iname] = file
    (in_dir / "inputs.json").write_text(json.dumps(manifest))
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    sym = {}
    for inp in gi.get_inputs():
        for d, size in zip(inp.shape, shapes.get(inp.name, [])):
            if isinstance(d, str):
                sym[d] = size
    (in_dir / "dims.json").write_text(json.dumps(sym))

    case = {"model": name, "batch": batch, "shapes": shapes, "runs": {}, "errors": {}}
    log(f"{name} batch {batch}: checking kiln run against onnxruntime")
    case["agreement"] = agreement(args.kiln, path, in_dir, in_dir.parent, args.threads,
                                  args.timeout)

    common = ["--threads", str(args.threads), "--iterations", str(args.iterations),
              "--warmup", str(args.warmup), "--max-seconds", str(args.max_seconds)]
    kiln_cmd = [str(args.kiln), "bench", str(path), "--json", *common]
    for iname, file in manifest.items():
        kiln_cmd += ["--input", f"{iname}={in_dir / file}"]
    for dname, size in sym.items():
        kiln_cmd += ["--dim", f"{dname}={size}"]
    runners = {"kiln": kiln_cmd}
    py = [sys.executable, __file__, "--model", str(path), "--inputs", str(in_dir), *common]
    runners["onnxruntime"] = py + ["--runner", "ort"]
    if args.openvino:
        runners["openvino"] = py + ["--runner", "openvino"]
    for r in range(args.rounds):
        for rt, cmd in runners.items():
            if rt in case["errors"]:
                continue  # failed once: it will fail again
            log(f"{name} batch {batch}: round {r + 1}/{args.rounds} {rt}")
            res, err = run_json(cmd, args.timeout)
            if res is None:
                case["errors"][rt] = err
                log(f"  {rt} failed: {err}")
                continue
            runs = case["runs"].setdefault(rt, {"latencies_ms": [], "round_medians_ms": [],
                                                "peak_rss_bytes": 0, "load_ms": []})
            runs["latencies_ms"] += res["latencies_ms"]
            runs["round_medians_ms"].append(statistics.median(res["latencies_ms"]))
            runs["peak_rss_bytes"] = max(runs["peak_rss_bytes"], res.get("peak_rss_bytes") or 0)
            runs["load_ms"].append(res.get("load_ms"))
            if rt != "kiln":
                runs["version"] = res.get("version")
    for runs in case["runs"].values():
        runs["median_ms"] = statistics.median(runs["latencies_ms"])
    med = {rt: r["median_ms"] for rt, r in case["runs"].items()}
    peers = [v for rt, v in med.items() if rt != "kiln"]
    if "kiln" in med and peers:
        case["kiln_vs_fastest_peer"] = med["kiln"] / min(peers)
    return case


def fmt_ms(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def fmt_mib(b) -> str:
    return "-" if not b else f"{b / 2**20:.0f}"


def table(cases: list[dict], runtimes: list[str]) -> list[str]:
    head = ["model", "batch"] + [f"{rt} ms" for rt in runtimes] + ["kiln/fastest"] + \
        [f"{rt} RSS MiB" for rt in runtimes] + ["agreement (kiln run vs ORT)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        if "skipped" in c:
            rows.append(f"| {c['model']} | {c['batch']} | skipped: {c['skipped']} |")
            continue
        runs = c["runs"]
        cells = [c["model"], str(c["batch"])]
        for rt in runtimes:
            if rt in runs:
                cells.append(fmt_ms(runs[rt]["median_ms"]))
            else:
                cells.append("failed" if rt in c["errors"] else "-")
        ratio = c.get("kiln_vs_fastest_peer")
        cells.append("-" if ratio is None else f"{ratio:.2f}x")
        for rt in runtimes:
            cells.append(fmt_mib(runs.get(rt, {}).get("peak_rss_bytes")))
        a = c.get("agreement", {})
        if "error" in a:
            cells.append(f"ERROR: {a['error']}")
        else:
            cells.append(f"{'ok' if a.get('ok') else 'MISMATCH'}: max abs {a['max_abs']:.2e}, "
                         f"rel {a['max_rel']:.2e}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def kiln_hw(kiln: Path) -> dict | None:
    res, _ = run_json([str(kiln), "hw", "--json", "--cached"], 120)
    return res


def report(path: Path, cases: list[dict], runtimes: list[str], args, hw: dict | None,
           versions: dict) -> None:
    lines = ["# kiln vs ONNX Runtime vs OpenVINO", "",
             "Generated by `cargo xtask bench-compare` (`scripts/bench_compare.py`); do not edit.", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- command: `bench_compare.py {' '.join(sys.argv[1:])}`",
             f"- threads: {args.threads}; rounds: {args.rounds} (runtimes alternated A B C per "
             f"round); per run: {args.warmup} warmup + {args.iterations} timed iterations "
             f"(no new iteration after {args.max_seconds:g} s)",
             "- latency: median of every timed iteration of all rounds; RSS: the largest peak "
             "RSS (VmHWM) of the runtime's process over the rounds (the ORT/OpenVINO runners "
             "are Python processes, so their RSS includes the interpreter and numpy)",
             "- shapes: each runtime compiles the model for these inputs' sizes of its "
             "symbolic dims (kiln `--dim`, ORT free dimension overrides, OpenVINO reshape)",
             "- kiln/fastest: kiln's median over the fastest peer's median (below 1: kiln is faster)",
             "- agreement: `kiln run` vs ORT outputs on the same inputs; max abs diff, and max "
             "abs diff over max |ORT output| (worst output)",
             f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items()) or 'n/a'}",
             f"- python: {platform.python_version()}", ""]
    if hw:
        m = hw.get("measured", {})
        caches = hw.get("caches", {})
        kib = lambda b: "?" if b is None else f"{b // 1024} KiB"  # noqa: E731
        lines += ["## Machine (`kiln hw --json`)", "",
                  f"- cpu: {hw.get('model_name')} ({hw.get('arch')}), {hw.get('cores')} cores",
                  f"- features: {' '.join(hw.get('features', []))}",
                  f"- caches: L1d {kib(caches.get('l1d_bytes'))}, L2 {kib(caches.get('l2_bytes'))}, "
                  f"L3 {kib(caches.get('l3_bytes'))}",
                  f"- measured on {m.get('threads')} thread(s): f32 peak "
                  f"{m.get('peak_f32_gflops', 0):.1f} GFLOP/s ({m.get('f32_path')}), memory "
                  f"{m.get('mem_bandwidth_gbs', 0):.1f} GB/s", ""]
    lines += ["## Results", ""] + table(cases, runtimes) + [""]
    errors = [(c["model"], c["batch"], rt, e) for c in cases for rt, e in c.get("errors", {}).items()]
    if errors:
        lines += ["## Failures", ""] + [f"- {m} batch {b}, {rt}: {e}" for m, b, rt, e in errors] + [""]
    if "openvino" not in runtimes:
        lines += ["OpenVINO was not run (the `openvino` package did not import).", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runner", choices=["ort", "openvino"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--save-outputs", help=argparse.SUPPRESS)
    ap.add_argument("--kiln", type=Path, help="the kiln binary")
    ap.add_argument("--models-dir", type=Path, default=Path("~/.cache/kiln/models"))
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help="comma-separated model names (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=30.0,
                    help="per run: no new iteration after this long (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=900.0, help="per subprocess (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--report", type=Path, help="write the Markdown report here")
    ap.add_argument("--json", type=Path, help="write every result (all latencies) here")
    args = ap.parse_args(argv)

    if args.threads < 1 or args.rounds < 1 or args.iterations < 1 or args.warmup < 0:
        ap.error("--threads, --rounds and --iterations must be >= 1, --warmup >= 0")
    if args.runner:
        if not (args.model and args.inputs):
            ap.error("--runner needs --model and --inputs")
        res = runner_ort(args) if args.runner == "ort" else runner_openvino(args)
        print(json.dumps(res))
        return 0

    if not args.kiln or not args.kiln.exists():
        ap.error(f"--kiln: no kiln binary at {args.kiln}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        batches = [int(b) for b in args.batch.split(",") if b]
    except ValueError:
        ap.error(f"--batch {args.batch!r}: give comma-separated integers")
    if not batches or min(batches) < 1:
        ap.error("--batch: sizes must be >= 1")
    models_dir = args.models_dir.expanduser()
    names = [m for m in args.models.split(",") if m]
    missing = [m for m in names if not (models_dir / f"{m}.onnx").exists()]
    if missing:
        ap.error(f"no model file for {', '.join(missing)} in {models_dir} "
                 f"(build them with `cargo xtask models NAME...`)")
    args.openvino = not args.no_openvino and have_openvino()
    runtimes = ["kiln", "onnxruntime"] + (["openvino"] if args.openvino else [])

    def log(msg):
        print(f"bench-compare: {msg}", file=sys.stderr, flush=True)

    cases = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        for name in names:
            for b in batches:
                cases.append(bench_case(name, models_dir / f"{name}.onnx", b, args, Path(tmp), log))
    versions = {}
    for c in cases:
        for rt, r in c.get("runs", {}).items():
            if r.get("version"):
                versions[rt] = r["version"]
    hw = kiln_hw(args.kiln)
    print("\n".join(table(cases, runtimes)))
    if args.report:
        report(args.report, cases, runtimes, args, hw, versions)
        log(f"wrote {args.report}")
    if args.json:
        args.json.write_text(json.dumps({"hw": hw, "cases": cases}, indent=1))
    bad = [c for c in cases if "skipped" not in c and not c.get("agreement", {}).get("ok")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
