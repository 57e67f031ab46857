#!/usr/bin/env python3
"""ONNX backend conformance runner for kiln.

Runs the official ONNX backend test data through kiln's public CLI,

    kiln run MODEL --input input_0.pb ... --output-dir DIR --output-format pb

and compares every output with the expected one the way the official runner
(onnx/backend/test/runner/__init__.py, Runner.assert_similar_outputs) does:
same number of outputs, same shapes, same dtypes, values within rtol/atol
(1e-3 / 1e-7 unless the case's data.json says otherwise; bfloat16 gets at
least two ULPs, rtol 2**-6), NaN == NaN, strings and bools exactly.

Test data (folder -> where it comes from):
  node               generated from onnx/backend/test/case/node/*.py with the
                     package's own collect_testcases(), written in the layout
                     of `backend-test-tools generate-data` (cmd_tools.py);
                     recent onnx wheels no longer ship data/node.
  real               the 9 "light" models shipped in data/light: the official
                     runner feeds them arange(n)/n float inputs and compares to
                     data/light/light_<name>_output_0.pb; that input data is
                     generated here too (model.onnx is a symlink into the wheel).
  simple, pytorch-converted, pytorch-operator
                     shipped in the wheel under onnx/backend/test/data/, used
                     in place.
Generated data lives in ~/.cache/kiln/onnx-backend-data/<onnx version>/ (see
--data-dir); it is built once, when missing (or with --regenerate).

Each case is classified as
  pass         every test_data_set matched
  wrong        kiln ran (exit 0) but an output is missing or does not match
  unsupported  kiln exited 3 (an op / dtype / feature kiln does not have)
  error        kiln exited 1 or 2 (or another non-zero code)
  crash        kiln died from a signal, or its stderr says 'panicked' or
               'internal error'
  timeout      kiln ran past --timeout and was killed (its whole process group)

--ort runs the same cases through onnxruntime (InferenceSession, CPU provider,
inputs fed by the session's input names in order, like onnxruntime.backend), in
the same run, as a reference column and a check of the harness itself.  An
onnxruntime load failure counts as 'unsupported'.  onnxruntime runs in-process
in the pool workers (one intra-op thread each) and has no per-case timeout.

Exit status and the last line:
  without --baseline: the last line is `N passed, M failed` over all kiln cases
  run (M = every case that is not 'pass'); exit 1 if M > 0.
  with --baseline FILE: the full counts are printed above, labelled; the last
  line is `N passed, M failed` for the regression gate only (N = cases that
  passed in the baseline and still pass, M = cases that passed in the baseline
  and no longer do); exit 1 if M > 0.  Newly passing cases are listed but do
  not affect the exit status; refresh the baseline with --write-baseline.

Usage:
    conformance.py [--kiln PATH] [-j N] [--timeout S] [--filter REGEX]
                   [--folders node,real,...] [--limit N] [--exclude-random]
                   [--ort] [--no-kiln] [--list-failures]
                   [--baseline FILE] [--write-baseline FILE]
                   [--report docs/conformance.md]
                   [--data-dir DIR] [--regenerate] [--generate-only]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ALL_FOLDERS = ["node", "real", "simple", "pytorch-converted", "pytorch-operator"]
GENERATED_FOLDERS = {"node", "real"}
STATUSES = ["pass", "wrong", "unsupported", "error", "crash", "timeout"]
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-7
REASON_CHARS = 300
WHEEL_DATA = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Ops whose output is random by definition (cases that use them cannot match a
# fixed expected output except by accident).
RANDOM_OPS = {"Bernoulli", "RandomNormal", "RandomNormalLike", "RandomUniform",
              "RandomUniformLike", "Multinomial"}
# Names that mark random outputs.  NB: the '_random' suffix of many reduce/argmax
# cases means "random input data", which is deterministic, so it is NOT here.
RANDOM_NAME_RE = re.compile(r"bernoulli|training_dropout|random_normal|random_uniform"
                            r"|multinomial")


# --------------------------------------------------------------------------
# Data generation
# --------------------------------------------------------------------------

def default_data_dir() -> Path:
    return Path.home() / ".cache" / "kiln" / "onnx-backend-data" / onnx.__version__


def _write_value(path: Path, type_proto: onnx.TypeProto, value, name: str) -> None:
    """Serialise one input/output value like cmd_tools.generate_data does."""
    if type_proto.HasField("map_type"):
        data = numpy_helper.from_dict(value, name).SerializeToString()
    elif type_proto.HasField("sequence_type"):
        data = numpy_helper.from_list(value, name).SerializeToString()
    elif type_proto.HasField("optional_type"):
        data = numpy_helper.from_optional(value, name).SerializeToString()
    else:
        assert type_proto.HasField("tensor_type"), f"unknown type for {name}"
        if isinstance(value, onnx.TensorProto):
            data = value.SerializeToString()
        else:
            data = numpy_helper.from_array(value, name).SerializeToString()
    path.write_bytes(data)


def _gen_node(out: Path) -> int:
    import warnings

    from onnx.backend.test.case import node as node_cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            cases = node_cases.collect_testcases()
    for case in cases:
        case_dir = out / case.name
        case_dir.mkdir(parents=True)
        (case_dir / "model.onnx").write_bytes(case.model.SerializeToString())
        graph = case.model.graph
        for i, (inputs, outputs) in enumerate(case.data_sets):
            ds = case_dir / f"test_data_set_{i}"
            ds.mkdir()
            for j, value in enumerate(inputs):
                _write_value(ds / f"input_{j}.pb", graph.input[j].type, value,
                             graph.input[j].name)
            for j, value in enumerate(outputs):
                _write_value(ds / f"output_{j}.pb", graph.output[j].type, value,
                             graph.output[j].name)
    return len(cases)


def _gen_real(out: Path) -> int:
    """The 'real' cases: light models with the official runner's dummy inputs."""
    from onnx.backend.test.case import model as model_cases

    n = 0
    onnx_parent = Path(onnx.__file__).resolve().parent.parent
    for case in model_cases.collect_testcases():
        if case.kind != "real":
            continue
        model_path = (onnx_parent / case.url).resolve()
        if not model_path.exists():
            print(f"warning: light model {model_path} missing; skipping {case.name}",
                  file=sys.stderr)
            continue
        case_dir = out / case.name
        ds = case_dir / "test_data_set_0"
        ds.mkdir(parents=True)
        (case_dir / "model.onnx").symlink_to(model_path)
        (case_dir / "data.json").write_text(json.dumps(
            {"url": case.url, "model_name": case.model_name,
             "rtol": case.rtol, "atol": case.atol}, sort_keys=True))
        model = onnx.load(str(model_path))
        inits = {t.name for t in model.graph.initializer}
        k = 0
        for x in model.graph.input:
            if x.name in inits:
                continue
            # Runner.generate_dummy_data(x, random=False): float inputs only.
            if x.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                raise RuntimeError(f"{case.name}: non-float input {x.name}")
            shape = tuple(d.dim_value if d.HasField("dim_value") else 1
                          for d in x.type.tensor_type.shape.dim)
            count = int(np.prod(shape))
            value = (np.arange(count).reshape(shape) / count).astype(np.float32)
            (ds / f"input_{k}.pb").write_bytes(
                numpy_helper.from_array(value).SerializeToString())
            k += 1
        prefix = str(model_path)[: -len(".onnx")]
        for i in range(len(model.graph.output)):
            src = Path(f"{prefix}_output_{i}.pb")
            if not src.exists():
                raise RuntimeError(f"{case.name}: expected output {src} missing "
                                   "(the official runner would compute it with the "
                                   "reference evaluator; not done here)")
            shutil.copy(src, ds / f"output_{i}.pb")
        n += 1
    return n


def ensure_data(data_dir: Path, regenerate: bool) -> dict:
    manifest_path = data_dir / "manifest.json"
    if manifest_path.exists() and not regenerate:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("onnx_version") == onnx.__version__:
            return manifest
        print(f"note: {data_dir} was generated by onnx {manifest.get('onnx_version')}, "
              f"this is onnx {onnx.__version__}; regenerating", file=sys.stderr)
    print(f"generating test data into {data_dir} (onnx {onnx.__version__}) ...",
          file=sys.stderr, flush=True)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=data_dir.name + ".tmp-", dir=data_dir.parent))
    t0 = time.monotonic()
    try:
        counts = {"node": _gen_node(tmp / "node")}
        t_node = time.monotonic() - t0
        counts["real"] = _gen_real(tmp / "real")
        seconds = time.monotonic() - t0
        for folder in ALL_FOLDERS:
            if folder not in GENERATED_FOLDERS:
                d = WHEEL_DATA / folder
                counts[folder] = len([p for p in d.iterdir() if (p / "model.onnx").exists()]) \
                    if d.is_dir() else 0
        manifest = {
            "onnx_version": onnx.__version__,
            "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "generation_seconds": round(seconds, 2),
            "node_generation_seconds": round(t_node, 2),
            "python": sys.version.split()[0],
            "numpy_version": np.__version__,
            "wheel_data_dir": str(WHEEL_DATA),
            "cases_per_folder": counts,
            "sources": {
                "node": "generated: onnx.backend.test.case.node.collect_testcases()",
                "real": "generated: data/light models with Runner.generate_dummy_data inputs",
                "simple": "in place: " + str(WHEEL_DATA / "simple"),
                "pytorch-converted": "in place: " + str(WHEEL_DATA / "pytorch-converted"),
                "pytorch-operator": "in place: " + str(WHEEL_DATA / "pytorch-operator"),
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if data_dir.exists():
            shutil.rmtree(data_dir)
        tmp.rename(data_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"generated in {seconds:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()), file=sys.stderr)
    return manifest


def folder_dir(data_dir: Path, folder: str) -> Path:
    return data_dir / folder if folder in GENERATED_FOLDERS else WHEEL_DATA / folder


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------

def discover(data_dir: Path, folders: list[str]) -> list[dict]:
    cases = []
    for folder in folders:
        base = folder_dir(data_dir, folder)
        if not base.is_dir():
            print(f"warning: no data for folder {folder!r} ({base})", file=sys.stderr)
            continue
        for d in sorted(base.iterdir()):
            if not (d / "model.onnx").exists():
                continue
            rtol, atol = DEFAULT_RTOL, DEFAULT_ATOL
            if (d / "data.json").exists():
                meta = json.loads((d / "data.json").read_text())
                rtol = meta.get("rtol", rtol)
                atol = meta.get("atol", atol)
            cases.append({"key": f"{folder}/{d.name}", "folder": folder, "name": d.name,
                          "dir": str(d), "rtol": rtol, "atol": atol})
    return cases


def model_op_info(case: dict) -> tuple[list[str], bool]:
    """(op types of the model's top-level nodes, 'domain.Op' for non-default
    domains; whether a Dropout is given a training_mode input)."""
    m = onnx.load(os.path.join(case["dir"], "model.onnx"), load_external_data=False)
    ops, training_dropout = [], False
    for n in m.graph.node:
        name = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        if name not in ops:
            ops.append(name)
        if n.op_type == "Dropout" and len(n.input) >= 3 and n.input[2]:
            training_dropout = True
    return ops, training_dropout


def is_random(case: dict) -> bool:
    return bool(RANDOM_NAME_RE.search(case["name"])) or case["training_dropout"] \
        or any(op.split(".")[-1] in RANDOM_OPS for op in case["ops"])


def data_sets(case_dir: str) -> list[str]:
    sets = glob.glob(os.path.join(case_dir, "test_data_set_*"))
    return sorted(sets, key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0))


def numbered(ds: str, prefix: str) -> list[str]:
    n = len(glob.glob(os.path.join(ds, f"{prefix}_*.pb")))
    return [os.path.join(ds, f"{prefix}_{i}.pb") for i in range(n)]


# --------------------------------------------------------------------------
# Loading and comparing values
# --------------------------------------------------------------------------

def type_kind(tp: onnx.TypeProto) -> str:
    for kind in ("tensor_type", "sequence_type", "optional_type", "map_type",
                 "sparse_tensor_type"):
        if tp.HasField(kind):
            return kind.replace("_type", "")
    return "unknown"


def load_value(path: str, tp: onnx.TypeProto):
    """Like Runner._load_proto: the file's proto type follows the model's type."""
    data = Path(path).read_bytes()
    kind = type_kind(tp)
    if kind == "sequence":
        p = onnx.SequenceProto()
        p.ParseFromString(data)
        return numpy_helper.to_list(p)
    if kind == "optional":
        p = onnx.OptionalProto()
        p.ParseFromString(data)
        return numpy_helper.to_optional(p)
    if kind == "tensor":
        p = onnx.TensorProto()
        p.ParseFromString(data)
        return numpy_helper.to_array(p)
    raise NotImplementedError(f"cannot load a {kind} value ({os.path.basename(path)})")


def _fmt(x) -> str:
    try:
        return f"{float(x):.6g}"
    except (TypeError, ValueError):
        return repr(x)


def compare_tensor(exp: np.ndarray, act, rtol: float, atol: float, label: str) -> str | None:
    act = np.asarray(act) if not isinstance(act, np.ndarray) else act
    if tuple(act.shape) != tuple(exp.shape):
        return f"{label}: shape {list(act.shape)} != expected {list(exp.shape)}"
    if exp.dtype == object or exp.dtype.kind in "US":
        def norm(a):
            return np.array([x.decode("utf-8", "surrogateescape") if isinstance(x, bytes) else str(x)
                             for x in a.reshape(-1)], dtype=object)
        if act.dtype != object and act.dtype.kind not in "US":
            return f"{label}: dtype {act.dtype} != expected strings"
        bad = norm(act) != norm(exp)
        if bad.any():
            i = int(np.argmax(bad))
            return (f"{label}: {int(bad.sum())}/{bad.size} strings differ "
                    f"(first at flat index {i}: {norm(act)[i]!r} != {norm(exp)[i]!r})")
        return None
    if act.dtype != exp.dtype:
        return f"{label}: dtype {act.dtype} != expected {exp.dtype}"
    if exp.size == 0:
        return None
    if exp.dtype == np.bool_:
        bad = act != exp
        if bad.any():
            return f"{label}: {int(bad.sum())}/{bad.size} bools differ"
        return None
    if exp.dtype.name == "bfloat16":
        rtol = max(rtol, 2 ** -6)  # two bfloat16 ULPs, as the official runner
    a = act.astype(np.float64)
    e = exp.astype(np.float64)
    with np.errstate(all="ignore"):
        ok = np.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
        if ok.all():
            return None
        bad = ~ok
        nan_bad = int((np.isnan(a) != np.isnan(e)).sum())
        diff = np.abs(a - e)
        finite = bad & np.isfinite(diff)
        msg = f"{label}: {int(bad.sum())}/{bad.size} values differ"
        if finite.any():
            max_abs = float(diff[finite].max())
            msg += f", max abs err {max_abs:.3g}"
            nz = finite & (e != 0)
            if nz.any():
                rel = diff[nz] / np.abs(e[nz])
                msg += f", max rel err {float(rel.max()):.3g}"
        if nan_bad:
            msg += f", {nan_bad} NaN mismatches"
        i = int(np.argmax(bad.reshape(-1)))
        msg += (f" (first at flat index {i}: got {_fmt(a.reshape(-1)[i])}, "
                f"expected {_fmt(e.reshape(-1)[i])}; rtol {rtol:g} atol {atol:g})")
        return msg


def compare_value(exp, act, rtol: float, atol: float, label: str) -> str | None:
    """Runner.assert_similar_outputs for one value; None when it matches."""
    if exp is None or act is None:  # empty optional
        if exp is None and act is None:
            return None
        return f"{label}: got {'None' if act is None else type(act).__name__}, " \
               f"expected {'None' if exp is None else type(exp).__name__}"
    if isinstance(exp, (list, tuple)):
        if not isinstance(act, (list, tuple)):
            return f"{label}: got {type(act).__name__}, expected a sequence"
        if len(act) != len(exp):
            return f"{label}: sequence of {len(act)} != expected {len(exp)}"
        for j, (e, a) in enumerate(zip(exp, act)):
            msg = compare_value(e, a, rtol, atol, f"{label}[{j}]")
            if msg:
                return msg
        return None
    if isinstance(act, (list, tuple)):
        return f"{label}: got a sequence, expected a tensor"
    return compare_tensor(exp, act, rtol, atol, label)


def one_line(text: str, limit: int = REASON_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------
# Workers (run in the process pool)
# --------------------------------------------------------------------------

_MARKER_DIR: str | None = None


def _worker_init(marker_dir: str) -> None:
    global _MARKER_DIR
    _MARKER_DIR = marker_dir
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _mark(key: str | None) -> None:
    if _MARKER_DIR is None:
        return
    path = os.path.join(_MARKER_DIR, str(os.getpid()))
    if key is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        with open(path, "w") as f:
            f.write(key)


def _stderr_reason(stderr: str, prefer: str | None = None) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if not lines:
        return ""
    pick = None
    if prefer:
        pick = next((ln for ln in lines if prefer in ln.lower()), None)
    if pick is None:
        pick = next((ln for ln in lines if ln.lower().startswith("error")), lines[-1])
    pick = re.sub(r"^error:\s*", "", pick)
    return one_line(pick)


def run_kiln_case(case: dict, kiln: str, timeout: float) -> dict:
    _mark("kiln:" + case["key"])
    try:
        return _run_kiln_case(case, kiln, timeout)
    except Exception as e:  # a harness bug must not take the run down
        return {"status": "error", "reason": one_line(f"harness error: {e!r}"),
                "trace": traceback.format_exc()}
    finally:
        _mark(None)


def _run_kiln_case(case: dict, kiln: str, timeout: float) -> dict:
    model_path = os.path.join(case["dir"], "model.onnx")
    model = onnx.load(model_path, load_external_data=False)
    outputs_info = list(model.graph.output)
    sets = data_sets(case["dir"])
    if not sets:
        return {"status": "error", "reason": "no test_data_set_* folder"}
    t_total = 0.0
    for ds in sets:
        ds_name = os.path.basename(ds)
        inputs = numbered(ds, "input")
        expected_files = numbered(ds, "output")
        with tempfile.TemporaryDirectory(prefix="kiln-conf-") as out_dir:
            cmd = [kiln, "run", model_path]
            for p in inputs:
                cmd += ["--input", p]
            cmd += ["--output-dir", out_dir, "--output-format", "pb"]
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True)
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.communicate()
                return {"status": "timeout", "reason": f"{ds_name}: killed after {timeout:g} s"}
            t_total += time.monotonic() - t0
            stderr = err.decode("utf-8", "replace")
            rc = proc.returncode
            if rc < 0:
                try:
                    sig = signal.Signals(-rc).name
                except ValueError:
                    sig = str(-rc)
                tail = _stderr_reason(stderr)
                return {"status": "crash",
                        "reason": one_line(f"{ds_name}: killed by {sig}" + (f": {tail}" if tail else ""))}
            low = stderr.lower()
            if "panicked" in low or "internal error" in low or rc == 101:
                return {"status": "crash",
                        "reason": f"{ds_name}: " + (_stderr_reason(stderr, "internal error")
                                                    or _stderr_reason(stderr, "panicked")
                                                    or f"exit {rc}")}
            if rc == 3:
                return {"status": "unsupported",
                        "reason": _stderr_reason(stderr, "unsupported") or "exit 3"}
            if rc != 0:
                what = {1: "exit 1", 2: "exit 2 (usage)"}.get(rc, f"exit {rc}")
                msg = _stderr_reason(stderr)
                return {"status": "error", "reason": f"{what}: {msg}" if msg else what}
            # exit 0: compare
            produced = len(glob.glob(os.path.join(out_dir, "output_*.pb")))
            if produced != len(expected_files):
                return {"status": "wrong",
                        "reason": f"{ds_name}: kiln wrote {produced} output file(s), "
                                  f"expected {len(expected_files)}"}
            for i, ef in enumerate(expected_files):
                exp = load_value(ef, outputs_info[i].type)
                got_path = os.path.join(out_dir, f"output_{i}.pb")
                try:
                    # Tensor, sequence or optional, as the model declares the output.
                    got = load_value(got_path, outputs_info[i].type)
                except Exception as e:
                    return {"status": "wrong",
                            "reason": one_line(f"{ds_name}: output_{i}.pb unreadable: {e}")}
                msg = compare_value(exp, got, case["rtol"], case["atol"], f"output {i}")
                if msg:
                    return {"status": "wrong", "reason": one_line(f"{ds_name}: {msg}")}
    return {"status": "pass", "reason": "", "seconds": round(t_total, 3)}


_ORT = None


def run_ort_case(case: dict) -> dict:
    _mark("ort:" + case["key"])
    try:
        return _run_ort_case(case)
    except Exception as e:
        return {"status": "error", "reason": one_line(f"harness error: {e!r}"),
                "trace": traceback.format_exc()}
    finally:
        _mark(None)


def _run_ort_case(case: dict) -> dict:
    global _ORT
    if _ORT is None:
        import onnxruntime
        onnxruntime.set_default_logger_severity(4)
        _ORT = onnxruntime
    ort = _ORT
    model_path = os.path.join(case["dir"], "model.onnx")
    model = onnx.load(model_path, load_external_data=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model_path, sess_options=so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        return {"status": "unsupported", "reason": one_line(str(e).strip().splitlines()[-1]
                                                            if str(e).strip() else repr(e))}
    names = [i.name for i in sess.get_inputs()]
    for ds in data_sets(case["dir"]):
        ds_name = os.path.basename(ds)
        try:
            inputs = [load_value(p, model.graph.input[i].type)
                      for i, p in enumerate(numbered(ds, "input"))]
            expected = [load_value(p, model.graph.output[i].type)
                        for i, p in enumerate(numbered(ds, "output"))]
        except NotImplementedError as e:
            return {"status": "error", "reason": one_line(f"{ds_name}: {e}")}
        if len(inputs) < len(names):
            return {"status": "error",
                    "reason": f"{ds_name}: {len(inputs)} input files for {len(names)} inputs"}
        feeds = {n: (np.asarray(v) if isinstance(v, np.generic) else v)
                 for n, v in zip(names, inputs)}
        try:
            got = sess.run(None, feeds)
        except Exception as e:
            return {"status": "error", "reason": one_line(f"{ds_name}: {e}")}
        if len(got) != len(expected):
            return {"status": "wrong",
                    "reason": f"{ds_name}: {len(got)} outputs, expected {len(expected)}"}
        for i, (e, g) in enumerate(zip(expected, got)):
            msg = compare_value(e, g, case["rtol"], case["atol"], f"output {i}")
            if msg:
                return {"status": "wrong", "reason": one_line(f"{ds_name}: {msg}")}
    return {"status": "pass", "reason": ""}


# --------------------------------------------------------------------------
# Scheduling
# --------------------------------------------------------------------------

def run_all(jobs_list: list[tuple[str, dict]], kiln: str, timeout: float,
            workers: int) -> dict[tuple[str, str], dict]:
    """jobs_list: (engine, case) with engine 'kiln' or 'ort'.  A worker that dies
    (e.g. onnxruntime segfaults in-process) breaks the pool: the jobs that were
    running then are re-run alone to find the culprit, which is marked 'crash';
    the others are re-run normally."""
    results: dict[tuple[str, str], dict] = {}
    total = len(jobs_list)
    done = 0
    last_print = time.monotonic()
    t_start = last_print

    def submit(ex, engine, case):
        if engine == "kiln":
            return ex.submit(run_kiln_case, case, kiln, timeout)
        return ex.submit(run_ort_case, case)

    def progress(force=False):
        nonlocal last_print
        now = time.monotonic()
        if force or now - last_print >= 15:
            last_print = now
            print(f"  [{done}/{total}] {now - t_start:.0f} s", file=sys.stderr, flush=True)

    pending = list(jobs_list)
    isolate: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="kiln-conf-markers-") as markers:
        while pending or isolate:
            broken: list[tuple[str, dict]] = []
            in_flight: set[str] = set()
            if pending:
                with cf.ProcessPoolExecutor(max_workers=workers, initializer=_worker_init,
                                            initargs=(markers,)) as ex:
                    futs = {submit(ex, eng, case): (eng, case) for eng, case in pending}
                    try:
                        for fut in cf.as_completed(futs):
                            eng, case = futs[fut]
                            try:
                                results[(eng, case["key"])] = fut.result()
                                done += 1
                                progress()
                            except BrokenProcessPool:
                                broken.append((eng, case))
                    except KeyboardInterrupt:
                        ex.shutdown(wait=False, cancel_futures=True)
                        raise
                if broken:
                    for f in os.listdir(markers):
                        try:
                            in_flight.add(Path(markers, f).read_text())
                        finally:
                            os.unlink(os.path.join(markers, f))
                    isolate += [j for j in broken if f"{j[0]}:{j[1]['key']}" in in_flight]
                    pending = [j for j in broken if f"{j[0]}:{j[1]['key']}" not in in_flight]
                    print(f"  worker died; re-running {len(isolate)} job(s) alone",
                          file=sys.stderr)
                else:
                    pending = []
            # run suspects one by one, each in a fresh single-worker pool
            while isolate:
                eng, case = isolate.pop(0)
                with cf.ProcessPoolExecutor(max_workers=1, initializer=_worker_init,
                                            initargs=(markers,)) as ex:
                    try:
                        results[(eng, case["key"])] = submit(ex, eng, case).result()
                    except BrokenProcessPool:
                        results[(eng, case["key"])] = {
                            "status": "crash",
                            "reason": f"{eng} worker process died on this case"}
                for f in os.listdir(markers):
                    os.unlink(os.path.join(markers, f))
                done += 1
                progress()
    progress(force=True)
    return results


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def tested_op(case: dict, by_name: dict[str, dict]) -> tuple[str, bool]:
    """(the op a node case tests, whether it is a function-expanded variant)."""
    m = re.match(r"^(.*)_expanded(_ver\d+)?$", case["name"])
    if m and m.group(1) in by_name:
        base = by_name[m.group(1)]
        return (base["ops"][0] if len(base["ops"]) == 1 else "+".join(base["ops"])), True
    return ("+".join(case["ops"]) if case["ops"] else "(no nodes)"), bool(m)


def kiln_identity(kiln: str) -> str:
    p = Path(kiln)
    if not p.exists():
        return f"{kiln} (missing)"
    h = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
    mtime = _dt.datetime.fromtimestamp(p.stat().st_mtime, _dt.timezone.utc)
    try:
        v = subprocess.run([kiln, "--version"], capture_output=True, text=True,
                           timeout=10).stdout.strip()
    except Exception:
        v = ""
    return f"{kiln} ({v or 'no --version output'}; sha256 {h}; built {mtime:%Y-%m-%d %H:%M} UTC)"


def summarize(cases, results, engine):
    per = defaultdict(Counter)
    for c in cases:
        r = results.get((engine, c["key"]))
        if r:
            per[c["folder"]][r["status"]] += 1
            per["total"][r["status"]] += 1
    return per


def write_report(path: Path, ctx: dict) -> None:
    cases, results = ctx["cases"], ctx["results"]
    use_kiln, use_ort = ctx["use_kiln"], ctx["use_ort"]
    folders = [f for f in ALL_FOLDERS if any(c["folder"] == f for c in cases)]
    kiln_per = summarize(cases, results, "kiln")
    ort_per = summarize(cases, results, "ort")
    n_cases = Counter(c["folder"] for c in cases)
    L = []
    L.append("# ONNX backend conformance")
    L.append("")
    L.append("<!-- Generated by scripts/conformance.py; do not edit by hand: re-run it. -->")
    L.append("")
    L.append(f"- onnx version: {onnx.__version__} (test data: {ctx['data_dir']}, "
             f"generated {ctx['manifest'].get('generated_at', '?')})")
    if use_ort:
        L.append(f"- onnxruntime version: {ctx['ort_version']} (CPUExecutionProvider, "
                 "measured in the same run)")
    if use_kiln:
        L.append(f"- kiln: {ctx['kiln_id']}")
    else:
        L.append("- kiln: **not run** (--no-kiln): this report shows onnxruntime's results "
                 "only, as a check of the harness")
    L.append("- folders: `node` generated from onnx's node test cases; `real` = the "
             "data/light models with the official runner's arange inputs; `simple`, "
             "`pytorch-converted`, `pytorch-operator` as shipped in the onnx wheel")
    L.append(f"- date: {ctx['date']}")
    L.append(f"- command: `{ctx['command']}`")
    L.append(f"- wall time: {ctx['wall']:.0f} s with -j {ctx['jobs']}, "
             f"per-run timeout {ctx['timeout']:g} s")
    L.append("- comparison: as onnx's Runner.assert_similar_outputs: output count, shapes, "
             "dtypes, values within rtol 1e-3 / atol 1e-7 (or the case's data.json; "
             "bfloat16 rtol >= 2^-6), NaN == NaN, strings and bools exactly")
    if ctx["excluded_random"]:
        L.append(f"- --exclude-random: {len(ctx['excluded_random'])} cases with random "
                 "outputs were not run (Bernoulli / Random* / Multinomial ops, "
                 "training-mode Dropout): " + ", ".join(f"`{k}`" for k in ctx["excluded_random"]))
    if ctx["selection_note"]:
        L.append(f"- selection: {ctx['selection_note']}")
    L.append("")
    L.append("## Summary")
    L.append("")
    head = ["folder", "cases"]
    if use_kiln:
        head += STATUSES
    if use_ort:
        head += ["ORT pass"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for f in folders + ["total"]:
        n = sum(n_cases.values()) if f == "total" else n_cases[f]
        row = [f"**{f}**" if f == "total" else f, str(n)]
        if use_kiln:
            row += [str(kiln_per[f][s]) for s in STATUSES]
        if use_ort:
            row += [str(ort_per[f]["pass"])]
        L.append("| " + " | ".join(row) + " |")
    L.append("")

    node_cases = [c for c in cases if c["folder"] == "node"]
    if node_cases:
        by_name = {c["name"]: c for c in ctx["all_node_cases"]}
        ops = defaultdict(lambda: Counter())
        for c in node_cases:
            op, expanded = tested_op(c, by_name)
            suffix = "_exp" if expanded else ""
            ops[op]["cases" + suffix] += 1
            if results.get(("kiln", c["key"]), {}).get("status") == "pass":
                ops[op]["pass" + suffix] += 1
            if results.get(("ort", c["key"]), {}).get("status") == "pass":
                ops[op]["ort" + suffix] += 1
        L.append("## Node cases by op")
        L.append("")
        L.append("A node case is counted under the op it tests: the single node of its model, "
                 "or, for the `_expanded` variants (the op's function body inlined), the op "
                 "of the case it was expanded from.")
        L.append("")
        head = ["op", "cases"]
        if use_kiln:
            head += ["kiln pass"]
        if use_ort:
            head += ["ORT pass"]
        head += ["expanded cases"]
        if use_kiln:
            head += ["kiln pass (expanded)"]
        if use_ort:
            head += ["ORT pass (expanded)"]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for op in sorted(ops, key=str.lower):
            c = ops[op]
            row = [f"`{op}`", str(c["cases"])]
            if use_kiln:
                row += [str(c["pass"])]
            if use_ort:
                row += [str(c["ort"])]
            row += [str(c["cases_exp"])]
            if use_kiln:
                row += [str(c["pass_exp"]) if c["cases_exp"] else ""]
            if use_ort:
                row += [str(c["ort_exp"]) if c["cases_exp"] else ""]
            L.append("| " + " | ".join(row) + " |")
        L.append("")

    for engine, title, on in (("kiln", "Cases kiln does not pass", use_kiln),
                              ("ort", "Cases onnxruntime does not pass", use_ort)):
        if not on:
            continue
        failing = [c for c in cases if results.get((engine, c["key"]), {}).get("status") != "pass"]
        L.append(f"## {title} ({len(failing)})")
        L.append("")
        if not failing:
            L.append("None.")
            L.append("")
            continue
        L.append("| case | status | reason |")
        L.append("|---|---|---|")
        for c in failing:
            r = results.get((engine, c["key"]), {"status": "not run", "reason": ""})
            L.append(f"| `{c['key']}` | {r['status']} | {md_escape(r.get('reason', ''))} |")
        L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))


def print_table(cases, results, use_kiln, use_ort) -> None:
    folders = [f for f in ALL_FOLDERS if any(c["folder"] == f for c in cases)]
    kp, op_ = summarize(cases, results, "kiln"), summarize(cases, results, "ort")
    n = Counter(c["folder"] for c in cases)
    head = ["folder", "cases"] + (STATUSES if use_kiln else []) + (["ORT pass"] if use_ort else [])
    rows = []
    for f in folders + ["total"]:
        row = [f, str(sum(n.values()) if f == "total" else n[f])]
        if use_kiln:
            row += [str(kp[f][s]) for s in STATUSES]
        if use_ort:
            row += [str(op_[f]["pass"])]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default=str(REPO_ROOT / "target" / "release" / "kiln"),
                    help="kiln binary (default: target/release/kiln)")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel workers (default 2)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds per kiln run before it is killed (default 60)")
    ap.add_argument("--filter", help="regex searched in 'folder/case' names")
    ap.add_argument("--folders", default=",".join(ALL_FOLDERS),
                    help=f"comma-separated subset of {','.join(ALL_FOLDERS)}")
    ap.add_argument("--limit", type=int, help="run at most N cases (after filtering)")
    ap.add_argument("--list-failures", action="store_true",
                    help="print every case that does not pass, with its reason")
    ap.add_argument("--exclude-random", action="store_true",
                    help="skip cases with random outputs (Bernoulli, Random*, Multinomial, "
                         "training-mode Dropout)")
    ap.add_argument("--baseline", help="JSON map case -> status; exit 1 on any regression "
                                       "of a case that passed in it")
    ap.add_argument("--write-baseline", help="write this run's kiln statuses as JSON")
    ap.add_argument("--report", help="write a Markdown report here (e.g. docs/conformance.md)")
    ap.add_argument("--ort", action="store_true",
                    help="also run every case through onnxruntime (reference column)")
    ap.add_argument("--no-kiln", action="store_true",
                    help="do not run kiln (with --ort: check the harness against onnxruntime)")
    ap.add_argument("--data-dir", type=Path, default=default_data_dir(),
                    help="generated test data (default ~/.cache/kiln/onnx-backend-data/<onnx ver>)")
    ap.add_argument("--regenerate", action="store_true", help="rebuild the generated data")
    ap.add_argument("--generate-only", action="store_true",
                    help="build the data if needed, print its manifest and exit")
    args = ap.parse_args()

    folders = [f.strip() for f in args.folders.split(",") if f.strip()]
    unknown = [f for f in folders if f not in ALL_FOLDERS]
    if unknown:
        ap.error(f"unknown folder(s) {unknown}; choose from {ALL_FOLDERS}")
    use_kiln = not args.no_kiln
    if not use_kiln and not args.ort:
        ap.error("--no-kiln needs --ort")
    if not use_kiln and (args.baseline or args.write_baseline):
        ap.error("--baseline/--write-baseline are about kiln; drop --no-kiln")
    kiln = os.path.abspath(args.kiln)
    if use_kiln and not (os.path.isfile(kiln) and os.access(kiln, os.X_OK)):
        print(f"error: kiln binary not found at {kiln} (build it, or pass --kiln, "
              "or --no-kiln --ort)", file=sys.stderr)
        return 2

    if use_kiln:
        try:
            v = subprocess.run([kiln, "--version"], capture_output=True, text=True, timeout=10)
            if v.returncode != 0 or not v.stdout.strip():
                print(f"warning: `{kiln} --version` printed nothing (exit {v.returncode}); "
                      "is this a current kiln build?", file=sys.stderr)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"warning: `{kiln} --version` failed: {e}", file=sys.stderr)

    manifest = ensure_data(args.data_dir.expanduser(), args.regenerate)
    if args.generate_only:
        print(json.dumps(manifest, indent=2))
        return 0

    all_cases = discover(args.data_dir.expanduser(), folders)
    for c in all_cases:
        c["ops"], c["training_dropout"] = model_op_info(c)
    all_node_cases = [c for c in all_cases if c["folder"] == "node"]
    cases = all_cases
    notes = []
    if args.filter:
        rx = re.compile(args.filter)
        cases = [c for c in cases if rx.search(c["key"])]
        notes.append(f"--filter {args.filter!r}")
    excluded_random = []
    if args.exclude_random:
        excluded_random = [c["key"] for c in cases if is_random(c)]
        cases = [c for c in cases if not is_random(c)]
    if args.limit is not None:
        cases = cases[: args.limit]
        notes.append(f"--limit {args.limit}")
    if folders != ALL_FOLDERS:
        notes.append(f"--folders {','.join(folders)}")
    if not cases:
        print("no cases selected", file=sys.stderr)
        return 2

    jobs_list = []
    for c in cases:
        if use_kiln:
            jobs_list.append(("kiln", c))
        if args.ort:
            jobs_list.append(("ort", c))
    print(f"running {len(cases)} cases ({', '.join(e for e, on in (('kiln', use_kiln), ('onnxruntime', args.ort)) if on)})"
          f" with -j {args.jobs}" + (f"; {len(excluded_random)} random cases excluded"
                                     if excluded_random else ""), file=sys.stderr, flush=True)
    t0 = time.monotonic()
    results = run_all(jobs_list, kiln, args.timeout, max(1, args.jobs))
    wall = time.monotonic() - t0

    traces = [(k, r["trace"]) for k, r in results.items() if "trace" in r]
    for (eng, key), tr in traces[:3]:
        print(f"harness error on {eng} {key}:\n{tr}", file=sys.stderr)

    ort_version = ""
    if args.ort:
        import onnxruntime
        ort_version = onnxruntime.__version__

    # ---- stdout summary
    print(f"ONNX backend conformance: onnx {onnx.__version__}"
          + (f", onnxruntime {ort_version}" if args.ort else "")
          + f", {len(cases)} cases, {wall:.0f} s")
    print_table(cases, results, use_kiln, args.ort)
    if excluded_random:
        print(f"(--exclude-random: {len(excluded_random)} random-output cases not run)")

    engine = "kiln" if use_kiln else "ort"
    statuses = {c["key"]: results[(engine, c["key"])]["status"] for c in cases}
    if args.list_failures:
        for eng, on in (("kiln", use_kiln), ("ort", args.ort)):
            if not on:
                continue
            for c in cases:
                r = results[(eng, c["key"])]
                if r["status"] != "pass":
                    print(f"{eng.upper() if eng == 'ort' else 'FAIL'} {c['key']}: "
                          f"{r['status']}: {r.get('reason', '')}")

    if args.report:
        ctx = {
            "cases": cases, "results": results, "use_kiln": use_kiln, "use_ort": args.ort,
            "data_dir": str(args.data_dir).replace(str(Path.home()), "~", 1), "manifest": manifest, "ort_version": ort_version,
            "kiln_id": kiln_identity(kiln) if use_kiln else "",
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python scripts/conformance.py " + shlex.join(sys.argv[1:]),
            "wall": wall, "jobs": args.jobs, "timeout": args.timeout,
            "excluded_random": excluded_random, "selection_note": "; ".join(notes),
            "all_node_cases": all_node_cases,
        }
        write_report(Path(args.report), ctx)
        print(f"report written to {args.report}")

    if args.write_baseline:
        Path(args.write_baseline).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_baseline).write_text(json.dumps(statuses, indent=1, sort_keys=True) + "\n")
        print(f"baseline written to {args.write_baseline}")

    n_pass = sum(1 for s in statuses.values() if s == "pass")
    n_fail = len(statuses) - n_pass
    label = "kiln" if use_kiln else "onnxruntime"
    counts = Counter(statuses.values())
    detail = ", ".join(f"{s} {counts[s]}" for s in STATUSES[1:] if counts[s])
    if not args.baseline:
        print(f"{label}: {n_pass} of {len(statuses)} cases pass" + (f" ({detail})" if detail else ""))
        print(f"{n_pass} passed, {n_fail} failed")
        return 1 if n_fail else 0

    baseline = json.loads(Path(args.baseline).read_text())
    if not isinstance(baseline, dict):
        print(f"error: {args.baseline} is not a JSON object", file=sys.stderr)
        return 2
    gated = [k for k, s in baseline.items() if s == "pass" and k in statuses]
    regressions = [k for k in gated if statuses[k] != "pass"]
    not_run = [k for k, s in baseline.items() if s == "pass" and k not in statuses]
    known = {c["key"] for c in all_cases}
    vanished = [k for k in not_run if k not in known and k.split("/")[0] in folders]
    newly = [k for k, s in statuses.items() if s == "pass" and baseline.get(k) != "pass"]
    print(f"all cases (informational, not gated): {label} {n_pass} passed, {n_fail} not passing "
          f"of {len(statuses)}" + (f" ({detail})" if detail else ""))
    for k in regressions:
        r = results[("kiln", k)]
        print(f"REGRESSION {k}: {r['status']}: {r.get('reason', '')}")
    for k in newly:
        print(f"newly passing (not in baseline as pass): {k}")
    if not_run:
        print(f"note: {len(not_run)} baseline-passing case(s) not run in this selection")
    if vanished:
        print(f"warning: {len(vanished)} baseline-passing case(s) no longer exist in the test "
              f"data (e.g. {vanished[0]}); not counted as regressions")
    print(f"regression gate vs {args.baseline}: {len(gated) - len(regressions)} of {len(gated)} "
          f"baseline-passing cases still pass, {len(regressions)} regressed, "
          f"{len(newly)} newly passing")
    print(f"{len(gated) - len(regressions)} passed, {len(regressions)} failed")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
