#!/usr/bin/env python3
"""Model-level oracle test: run each test model in kiln and in onnxruntime and compare.

For every model (default: all of make_models.MODELS) this script
  1. builds the model with make_models.py if it is missing or stale,
  2. makes seeded random inputs that fit the model (token ids inside the
     vocabulary, a realistic attention mask, ...) and saves them as .npy,
  3. runs onnxruntime (CPU, default optimisations) for the reference outputs,
  4. runs `KILN run MODEL --input NAME=PATH.npy ... --output-dir DIR`,
  5. compares every output: same shape, same dtype, and for floats
     |kiln - ort| <= ATOL + RTOL * |ort| element-wise (integers and bools
     must match exactly).

It prints one line per model, `PASS name (...)` or `FAIL name: reason`,
then `N passed, M failed` on a line of its own, and exits 1 if anything
failed.  kiln runs under a timeout (600 s per model by default), so a hung
or crashed kiln is reported as a failure, never waited on forever.

Usage:
    compare_with_ort.py [--only NAME ...] [--models-dir DIR] [--kiln PATH]
                        [--keep DIR] [--timeout S] [--seed N] [-v]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_models  # noqa: E402  (needs the path tweak above)

RTOL = 1e-4
ATOL = 1e-5

# Symbolic dims that the model registry does not pin down.
DEFAULT_DIMS = {"N": 1, "B": 1, "batch": 1, "batch_size": 1, "S": 128, "seq": 128,
                "sequence": 128, "sequence_length": 128}

STDERR_TAIL = 4000  # characters of kiln's stderr to show on failure


def sanitize(name: str) -> str:
    """File stem kiln uses for a tensor name (same rule as the kiln CLI)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

NP_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def gather_table_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Graph input -> number of rows of the embedding table it indexes.

    Token ids must stay inside the vocabulary (out-of-range Gather indices
    are an error, not a test), so look for Gather(table, input) nodes where
    the table is an initializer or a Constant.
    """
    rows = {t.name: t.dims[0] for t in model.graph.initializer if t.dims}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.dims:
                    rows[n.output[0]] = a.t.dims[0]
    sizes: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[0] in rows:
            idx = n.input[1]
            sizes[idx] = min(sizes.get(idx, rows[n.input[0]]), rows[n.input[0]])
    return sizes


def concrete_shape(shape, dims: dict) -> list[int]:
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        else:  # symbolic (str) or unknown (None)
            out.append(dims.get(d, DEFAULT_DIMS.get(d, 1)) if d is not None else 1)
    return out


def make_inputs(sess: ort.InferenceSession, model: onnx.ModelProto, dims: dict,
                seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    table_rows = gather_table_sizes(model)
    feeds = {}
    for inp in sess.get_inputs():
        shape = concrete_shape(inp.shape, dims)
        dtype = NP_DTYPES.get(inp.type)
        if dtype is None:
            raise ValueError(f"input {inp.name!r} has unsupported type {inp.type}")
        lname = inp.name.lower()
        if dtype == np.bool_:
            a = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer) and "mask" in lname:
            # Mostly ones with some trailing padding per row, like a padded
            # batch: exercises the masking without masking a whole row.
            a = np.ones(shape, dtype)
            if len(shape) == 2 and shape[1] > 1:
                for row in a:
                    pad = rng.integers(1, max(2, shape[1] // 4))
                    row[shape[1] - pad:] = 0
        elif np.issubdtype(dtype, np.integer) and "token_type" in lname:
            # Segment A then segment B, like a sentence pair.
            a = np.zeros(shape, dtype)
            if len(shape) == 2:
                a[:, shape[1] // 2:] = 1
        elif np.issubdtype(dtype, np.integer):
            a = rng.integers(0, table_rows.get(inp.name, 10), shape).astype(dtype)
        else:
            a = rng.standard_normal(shape).astype(dtype)
        feeds[inp.name] = a
    return feeds


# --------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------


@dataclass
class Diff:
    ok: bool
    max_abs: float
    message: str


def compare(name: str, actual: np.ndarray, expected: np.ndarray) -> Diff:
    if actual.shape != expected.shape:
        return Diff(False, float("inf"), f"output {name!r}: shape {list(actual.shape)}, "
                                         f"expected {list(expected.shape)}")
    if actual.dtype != expected.dtype:
        return Diff(False, float("inf"), f"output {name!r}: dtype {actual.dtype}, expected {expected.dtype}")
    if expected.size == 0:
        return Diff(True, 0.0, f"output {name!r}: empty")

    if not np.issubdtype(expected.dtype, np.floating):
        # Integers and bools are exact: a tolerance on int64 ids or counts
        # would hide real bugs.
        bad = int(np.count_nonzero(actual != expected))
        max_abs = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
        if bad:
            return Diff(False, max_abs, f"output {name!r}: {bad} of {expected.size} elements differ "
                                        f"(exact match required for {expected.dtype})")
        return Diff(True, 0.0, f"output {name!r}: exact match ({expected.dtype})")

    a = actual.astype(np.float64)
    b = expected.astype(np.float64)
    # Identical values count as equal even when they are inf, and NaN
    # matches NaN in the same place.
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        err = np.abs(a - b)
        within = err <= ATOL + RTOL * np.abs(b)
    bad = ~(same | within)
    n_bad = int(np.count_nonzero(bad))
    finite_err = np.where(same, 0.0, err)
    finite_err = finite_err[np.isfinite(finite_err)]
    max_abs = float(finite_err.max()) if finite_err.size else 0.0
    nonzero = (b != 0) & np.isfinite(err) & ~same
    max_rel = float((err[nonzero] / np.abs(b[nonzero])).max()) if nonzero.any() else 0.0
    # How much of the tolerance the worst element uses (1.0 = at the limit):
    # shows how close a passing model is to failing.
    with np.errstate(invalid="ignore"):
        use = np.where(same, 0.0, err / (ATOL + RTOL * np.abs(b)))
    tol_use = float(np.nanmax(use)) if np.isfinite(use).any() else float("inf")
    if n_bad:
        n_nan = int(np.count_nonzero(np.isnan(a) & ~np.isnan(b)))
        extra = f", {n_nan} NaN where ort is not" if n_nan else ""
        first = np.unravel_index(np.argmax(bad), bad.shape)
        return Diff(False, max_abs,
                    f"output {name!r}: {n_bad} of {b.size} elements out of tolerance{extra} "
                    f"(max_abs={max_abs:.3g}, max_rel={max_rel:.3g}; first at {list(map(int, first))}: "
                    f"kiln={a[first]:.9g} ort={b[first]:.9g})")
    return Diff(True, max_abs, f"output {name!r}: max_abs={max_abs:.3g} max_rel={max_rel:.3g} "
                               f"tolerance_used={tol_use:.2f}")


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def run_kiln(kiln: Path, model: Path, inputs: dict[str, Path], out_dir: Path,
             timeout: float) -> tuple[int | None, str, float]:
    """Run the kiln CLI; returns (exit code or None on timeout, stderr, seconds)."""
    cmd = [str(kiln), "run", str(model)]
    for name, path in inputs.items():
        cmd += ["--input", f"{name}={path}"]
    cmd += ["--output-dir", str(out_dir)]
    t0 = time.perf_counter()
    # Own session/process group, so a timeout can kill kiln together with
    # anything it spawned, and nothing keeps our pipes open afterwards.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        code = None
    return code, err.decode("utf-8", "replace"), time.perf_counter() - t0


def stderr_block(text: str, limit: int = STDERR_TAIL) -> str:
    """kiln's stderr (its tail if long) as extra lines under a FAIL line."""
    text = text.strip()
    if not text:
        return ""
    return "\n" + (text if len(text) <= limit else "..." + text[-limit:])


def check_model(name: str, path: Path, dims: dict, kiln: Path, work: Path, args) -> tuple[bool, str]:
    """Run one model through both runtimes; returns (passed, report line)."""
    if not kiln.exists():
        return False, f"FAIL {name}: kiln binary not found at {kiln}"
    in_dir, ref_dir, out_dir = work / "inputs", work / "expected", work / "kiln"
    # Start from empty dirs: with --keep, outputs left by an earlier run
    # must not be mistaken for what this kiln run wrote.
    for d in (in_dir, ref_dir, out_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)

    # The graph tells make_inputs the vocabulary sizes; ORT loads the file itself.
    model = onnx.load(str(path), load_external_data=False)

    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = make_inputs(sess, model, dims, args.seed)
        expected = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    except Exception as e:  # noqa: BLE001 - any ORT failure is a finding to report
        return False, f"FAIL {name}: onnxruntime failed: {type(e).__name__}: {e}"
    ort_s = time.perf_counter() - t0
    del model, sess  # free ORT's copy of the weights before kiln loads its own

    input_paths = {}
    for iname, arr in feeds.items():
        p = in_dir / f"{sanitize(iname)}.npy"
        np.save(p, arr)
        input_paths[iname] = p
    for oname, arr in expected.items():
        np.save(ref_dir / f"{sanitize(oname)}.npy", arr)

    try:
        code, stderr, kiln_s = run_kiln(kiln, path, input_paths, out_dir, args.timeout)
    except OSError as e:
        return False, f"FAIL {name}: could not start kiln: {e}"
    if code is None:
        return False, f"FAIL {name}: kiln timed out after {args.timeout:g}s{stderr_block(stderr)}"
    if code != 0:
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
               else f"exited with status {code}")
        return False, f"FAIL {name}: kiln {how}{stderr_block(stderr)}"

    if not any(out_dir.iterdir()):
        return False, (f"FAIL {name}: kiln exited with status 0 but wrote nothing to the output dir"
                       f"{stderr_block(stderr)}")

    problems, details, max_abs = [], [], 0.0
    for oname, ref in expected.items():
        f = out_dir / f"{sanitize(oname)}.npy"
        if not f.exists():
            problems.append(f"output {oname!r}: kiln wrote no {f.name}")
            continue
        try:
            got = np.load(f, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            problems.append(f"output {oname!r}: unreadable {f.name}: {e}")
            continue
        d = compare(oname, got, ref)
        max_abs = max(max_abs, d.max_abs)
        (details if d.ok else problems).append(d.message)
    if args.verbose:
        for line in details:
            print(f"  {name}: {line}")
    if problems:
        return False, f"FAIL {name}: " + "; ".join(problems)
    return True, f"PASS {name} (max_abs={max_abs:.3g}, time kiln={kiln_s:.2f}s ort={ort_s:.2f}s)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="models to test (default: all)")
    ap.add_argument("--models-dir", default="~/.cache/kiln/models", help="where NAME.onnx live")
    ap.add_argument("--kiln", default="target/release/kiln", help="kiln CLI binary")
    ap.add_argument("--keep", metavar="DIR", help="keep inputs/expected/kiln outputs under DIR/NAME/")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per kiln run")
    ap.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    ap.add_argument("-v", "--verbose", action="store_true", help="print per-output error stats")
    args = ap.parse_args(argv)

    models_dir = Path(args.models_dir).expanduser()
    kiln = Path(args.kiln).expanduser().resolve()
    names = args.only or list(make_models.MODELS)

    passed = failed = 0
    keep_root = Path(args.keep).expanduser() if args.keep else None
    for name in names:
        try:
            if name in make_models.MODELS:
                # Builds the model if it is missing or older than make_models.py.
                path = make_models.ensure_models(
                    models_dir, [name], log=lambda m: print(m, file=sys.stderr, flush=True))[name]
                dims = make_models.MODELS[name].test_dims
            else:
                # Not one of ours, but test it anyway if the file is there.
                path, dims = models_dir / f"{name}.onnx", {}
                if not path.exists():
                    raise FileNotFoundError(f"unknown model and no {path}")
            if keep_root:
                ok, line = check_model(name, path, dims, kiln, keep_root / name, args)
            else:
                with tempfile.TemporaryDirectory(prefix=f"kiln-cmp-{name}-") as tmp:
                    ok, line = check_model(name, path, dims, kiln, Path(tmp), args)
        except Exception as e:  # noqa: BLE001 - one broken model must not stop the rest
            ok, line = False, f"FAIL {name}: {type(e).__name__}: {e}"
        print(line, flush=True)
        passed += ok
        failed += not ok

    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
