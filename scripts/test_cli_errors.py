#!/usr/bin/env python3
"""Malformed models and bad inputs must fail cleanly: the right exit code, one
line on stderr that says what was wrong, no panic, no hang, no huge allocation.

Usage: test_cli_errors.py --kiln target/release/kiln
Ends with a line 'N passed, M failed'; exit 1 if any case failed.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def relu_model():
    return model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                 [vi("x", TensorProto.FLOAT, [2, 3])], [vi("y", TensorProto.FLOAT, [2, 3])])


def build_cases(d):
    """Returns (name, argv, expected exit code, words the message must contain)."""
    cases = []

    def save(name, m):
        path = os.path.join(d, name)
        onnx.save(m, path)
        return path

    def npy(name, arr):
        path = os.path.join(d, name)
        np.save(path, arr)
        return path

    good = save("relu.onnx", relu_model())
    x = npy("x.npy", np.ones((2, 3), np.float32))

    # Truncated model file.
    raw = open(good, "rb").read()
    trunc = os.path.join(d, "truncated.onnx")
    open(trunc, "wb").write(raw[: len(raw) // 2])
    cases.append(("truncated file", ["run", trunc, "--input", x], 1, ["ONNX"]))

    # Not a model at all.
    junk = os.path.join(d, "junk.onnx")
    open(junk, "wb").write(os.urandom(300))
    cases.append(("random bytes", ["run", junk], 1, []))

    cases.append(("missing file", ["run", os.path.join(d, "nope.onnx")], 1, ["nope.onnx"]))

    # A cycle.
    cyc = model([helper.make_node("Add", ["x", "b"], ["a"], name="n1"),
                 helper.make_node("Relu", ["a"], ["b"], name="n2")],
                [vi("x", TensorProto.FLOAT, [2, 3])], [vi("b", TensorProto.FLOAT, [2, 3])])
    cases.append(("cycle", ["run", save("cycle.onnx", cyc), "--input", x], 1, ["cycle"]))

    # An undefined value.
    undef = model([helper.make_node("Relu", ["nothing"], ["y"], name="lost")],
                  [vi("x", TensorProto.FLOAT, [2, 3])], [vi("y", TensorProto.FLOAT, [2, 3])])
    cases.append(("undefined value", ["run", save("undef.onnx", undef), "--input", x], 1, ["lost", "nothing"]))

    # An unknown op: exit 3 with the contract's message.
    unk = model([helper.make_node("FrobnicateTensor", ["x"], ["y"], name="frob")],
                [vi("x", TensorProto.FLOAT, [2, 3])], [vi("y", TensorProto.FLOAT, [2, 3])])
    cases.append(("unknown op", ["run", save("unknown.onnx", unk), "--input", x], 3,
                  ["unsupported: FrobnicateTensor (opset 17) at node frob"]))

    # A custom-domain op is unsupported too.
    ms = model([helper.make_node("FusedGemm", ["x"], ["y"], name="fg", domain="com.microsoft")],
               [vi("x", TensorProto.FLOAT, [2, 3])], [vi("y", TensorProto.FLOAT, [2, 3])])
    ms.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    cases.append(("custom domain op", ["run", save("ms.onnx", ms), "--input", x], 3, ["FusedGemm", "fg"]))

    # A dim of 2^40 computed at run time (ConstantOfShape).
    big = model([helper.make_node("ConstantOfShape", ["shape"], ["y"], name="huge")],
                [], [vi("y", TensorProto.FLOAT, None)],
                [numpy_helper.from_array(np.array([1 << 40], np.int64), "shape")])
    cases.append(("2^40 dim at run time", ["run", save("big.onnx", big)], 1, ["huge"]))

    # An initializer declaring 2^40 elements.
    t = TensorProto()
    t.name = "w"
    t.data_type = TensorProto.FLOAT
    t.dims.extend([1 << 40])
    bigw = model([helper.make_node("Add", ["x", "w"], ["y"], name="add")],
                 [vi("x", TensorProto.FLOAT, [1])], [vi("y", TensorProto.FLOAT, [1])], [t])
    cases.append(("2^40 initializer", ["run", save("bigw.onnx", bigw)], 1, ["w"]))

    # A graph input declaring a 2^40 dim with random inputs.
    bigin = model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                  [vi("x", TensorProto.FLOAT, [1 << 40])], [vi("y", TensorProto.FLOAT, [1 << 40])])
    cases.append(("2^40 input dim", ["run", save("bigin.onnx", bigin)], 1, ["x"]))

    # External data escaping the model folder.
    sub = os.path.join(d, "sub")
    os.makedirs(sub, exist_ok=True)
    np.ones(6, np.float32).tofile(os.path.join(d, "secret.bin"))
    w = TensorProto()
    w.name = "w"
    w.data_type = TensorProto.FLOAT
    w.dims.extend([2, 3])
    w.data_location = TensorProto.EXTERNAL
    e = w.external_data.add()
    e.key, e.value = "location", "../secret.bin"
    ext = model([helper.make_node("Add", ["x", "w"], ["y"], name="add")],
                [vi("x", TensorProto.FLOAT, [2, 3])], [vi("y", TensorProto.FLOAT, [2, 3])], [w])
    cases.append(("external data ../", ["run", save("sub/ext.onnx", ext), "--input", x], 1, ["escapes"]))

    # Gather index out of range at run time.
    gat = model([helper.make_node("Gather", ["data", "idx"], ["y"], name="gather_ids", axis=0)],
                [vi("idx", TensorProto.INT64, [2])], [vi("y", TensorProto.FLOAT, [2, 4])],
                [numpy_helper.from_array(np.zeros((5, 4), np.float32), "data")])
    idx = npy("idx.npy", np.array([1, 100], np.int64))
    cases.append(("gather out of range", ["run", save("gather.onnx", gat), "--input", idx], 1,
                  ["gather_ids", "100"]))

    # Bad inputs to a good model.
    cases.append(("wrong dtype", ["run", good, "--input", npy("xi.npy", np.ones((2, 3), np.int32))], 1,
                  ["'x'", "f32", "i32"]))
    cases.append(("wrong shape", ["run", good, "--input", npy("xs.npy", np.ones((3, 2), np.float32))], 1,
                  ["'x'", "[2, 3]"]))
    cases.append(("wrong name", ["run", good, "--input", "nope=" + x], 1, ["nope", "x"]))
    cases.append(("bad input file", ["run", good, "--input", junk], 1, ["not a .npy file", "TensorProto"]))

    # Usage errors exit 2.
    cases.append(("unknown flag", ["run", good, "--frobnicate"], 2, []))
    cases.append(("bad --dim", ["run", good, "--dim", "N"], 2, ["NAME=VALUE"]))
    cases.append(("--dim twice", ["run", good, "--dim", "N=1", "--dim", "N=2"], 2,
                  ["N", "twice"]))

    # --dim fixes a symbolic dim at load: an input of another size is refused,
    # naming the input, the fixed shape and the dim.
    sym = save("relu_sym.onnx", model([helper.make_node("Relu", ["x"], ["y"])],
                                      [vi("x", TensorProto.FLOAT, ["N", 3])],
                                      [vi("y", TensorProto.FLOAT, ["N", 3])]))
    cases.append(("input against a fixed --dim", ["run", sym, "--dim", "N=4", "--input", x], 1,
                  ["'x'", "[4, 3]", "N=4"]))
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default="target/release/kiln")
    args = ap.parse_args()
    passed = failed = 0
    with tempfile.TemporaryDirectory() as d:
        for name, argv, code, words in build_cases(d):
            try:
                p = subprocess.run([args.kiln] + argv, capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                print(f"FAIL {name}: timed out")
                failed += 1
                continue
            err = p.stderr.strip()
            problems = []
            if p.returncode != code:
                problems.append(f"exit code {p.returncode}, expected {code}")
            if "panicked" in err or "internal error" in err or "RUST_BACKTRACE" in err:
                problems.append("panicked")
            lines = [l for l in err.splitlines() if l.strip()]
            # clap's usage errors print a short usage block; ours must be one line.
            if code != 2 and len(lines) != 1:
                problems.append(f"stderr has {len(lines)} lines")
            for w in words:
                if w not in err:
                    problems.append(f"message lacks {w!r}")
            if problems:
                print(f"FAIL {name}: {'; '.join(problems)}\n    stderr: {err[:500]}")
                failed += 1
            else:
                print(f"PASS {name}: {lines[0] if lines else ''}")
                passed += 1
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
