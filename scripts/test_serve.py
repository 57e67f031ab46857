#!/usr/bin/env python3
"""End-to-end test of `kiln serve` (KServe Open Inference Protocol v2).

Starts real `kiln serve` processes on free loopback ports (127.0.0.1 only) and
checks them with the official Triton clients (`tritonclient[http,grpc]`) and raw
HTTP: JSON, binary and gRPC inference against `kiln run` on the same input; a
suite of malformed requests (all must be 4xx and the server stays healthy);
model states (ports open before models load: live at once, each model LOADING
until READY or UNAVAILABLE with its error); bounded load tests with
`kiln bench --server` (closed loop with dynamic batching on and off, Poisson
arrivals, JSON tensors, overload with a tiny queue counted as 429s, loopback
only); overload with a tiny queue (fast 429s); a request timeout; metrics; and SIGTERM
during load (every request sent before the signal answered, exit 0).

Usage: test_serve.py --kiln target/release/kiln [--model mobilenetv2.onnx] [--quick]
Every loop is bounded in count and time. Ends with 'N passed, M failed';
exit 1 if any check failed.
"""
import argparse
import concurrent.futures as cf
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HOST = "127.0.0.1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

passed = 0
failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")
    sys.stdout.flush()
    return ok


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, kiln, path, extra=(), log=None):
        self.http_port = free_port()
        self.grpc_port = free_port()
        while self.grpc_port == self.http_port:
            self.grpc_port = free_port()
        self.log = open(log or os.devnull, "w")
        argv = [kiln, "serve", path, "--host", HOST, "--http-port", str(self.http_port),
                "--grpc-port", str(self.grpc_port), *extra]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"{HOST}:{self.http_port}"
        self.grpc_url = f"{HOST}:{self.grpc_port}"

    def wait_live(self, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                return False
            try:
                st, _, _ = request(self.url, "GET", "/v2/health/live", timeout=2)
                if st == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def wait_models(self, names, timeout=300):
        """Waits until no model in `names` is LOADING (the ports open before the
        models load); returns ({name: state}, the set of states seen on the way)."""
        end = time.time() + timeout
        seen = set()
        states = {}
        while time.time() < end and self.proc.poll() is None:
            for n in names:
                try:
                    st, _, body = request(self.url, "GET", f"/v2/models/{n}/ready", timeout=5)
                except OSError:
                    continue
                try:
                    v = json.loads(body)
                except ValueError:
                    v = {}
                states[n] = "READY" if st == 200 else v.get("state", f"HTTP {st}")
                seen.add(states[n])
            if len(states) == len(names) and "LOADING" not in states.values():
                break
            time.sleep(0.05)
        return states, seen

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def request(url, method, path, body=None, headers=None, timeout=60, conn=None):
    """One HTTP request; returns (status, headers dict (lowercase), body bytes)."""
    own = conn is None
    if own:
        host, port = url.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        if own:
            conn.close()


def binary_infer_body(name, arr, datatype="FP32", binary_out=True, extra=None):
    req = {"inputs": [{"name": name, "shape": list(arr.shape), "datatype": datatype,
                       "parameters": {"binary_data_size": arr.nbytes}}],
           "parameters": {"binary_data_output": binary_out}}
    if extra:
        req.update(extra)
    hdr = json.dumps(req).encode()
    return hdr + arr.tobytes(), {"Inference-Header-Content-Length": str(len(hdr)),
                                 "Content-Type": "application/octet-stream"}


def parse_binary_response(headers, data, dtype=np.float32):
    hl = int(headers.get("inference-header-content-length", len(data)))
    meta = json.loads(data[:hl])
    outs, at = {}, hl
    for o in meta["outputs"]:
        if "data" in o:
            outs[o["name"]] = np.array(o["data"], dtype=dtype).reshape(o["shape"])
        else:
            n = o["parameters"]["binary_data_size"]
            outs[o["name"]] = np.frombuffer(data[at:at + n], dtype=dtype).reshape(o["shape"])
            at += n
    return meta, outs


def kiln_run(kiln, model, input_name, arr, tmp):
    inp = os.path.join(tmp, "in.npy")
    out = os.path.join(tmp, "out")
    shutil.rmtree(out, ignore_errors=True)
    np.save(inp, arr)
    subprocess.run([kiln, "run", model, "-i", f"{input_name}={inp}", "--output-dir", out],
                   check=True, capture_output=True, timeout=300)
    return {f[:-4]: np.load(os.path.join(out, f)) for f in os.listdir(out)}


def close(a, b, tol=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.allclose(a, b, rtol=tol, atol=tol)


def find_model(name):
    for d in (os.path.expanduser("~/.cache/kiln/models"), "/tmp/kiln-models"):
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    out = os.path.expanduser("~/.cache/kiln/models")
    stem = name[:-5]
    try:
        subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "make_models.py"), out,
                        "--only", stem, "--no-check"], check=True, timeout=600,
                       capture_output=True)
    except (subprocess.SubprocessError, OSError) as e:
        print(f"note: could not build {name}: {e}")
        return None
    p = os.path.join(out, name)
    return p if os.path.exists(p) else None


def make_repo(tmp, big_model, tiny_model):
    repo = os.path.join(tmp, "repo")

    def add(name, src, config=None, raw=None):
        d = os.path.join(repo, name, "1")
        os.makedirs(d)
        if raw is not None:
            with open(os.path.join(d, "model.onnx"), "wb") as f:
                f.write(raw)
        else:
            os.symlink(os.path.abspath(src), os.path.join(d, "model.onnx"))
        if config is not None:
            with open(os.path.join(repo, name, "config.json"), "w") as f:
                json.dump(config, f)

    add("tiny", tiny_model)
    # Batching on and off, each with the default max_concurrency (1).
    add("big", big_model, {"max_batch_size": 8, "max_queue_delay_us": 4000,
                           "dynamic_batching": True})
    add("big_nb", big_model, {"dynamic_batching": False})
    add("big_q", big_model, {"dynamic_batching": False, "max_queue_size": 1,
                             "max_concurrency": 1})
    add("big_to", big_model, {"dynamic_batching": False, "timeout_ms": 1, "max_concurrency": 1})
    add("broken", None, raw=b"this is not an onnx model")
    return repo


# ---------------------------------------------------------------------------


def test_health_and_metadata(srv):
    st, _, body = request(srv.url, "GET", "/v2/health/live")
    check("health/live 200", st == 200, st)
    st, _, body = request(srv.url, "GET", "/v2/health/ready")
    check("health/ready 503 while a model failed to load", st == 503, st)
    st, _, body = request(srv.url, "GET", "/v2")
    meta = json.loads(body)
    check("server metadata", st == 200 and meta.get("name") == "kiln"
          and "binary_tensor_data" in meta.get("extensions", []), body[:200])
    st, _, body = request(srv.url, "GET", "/v2/models/big")
    meta = json.loads(body)
    check("model metadata -1 for the batch dim", st == 200 and meta["inputs"][0]["shape"][0] == -1
          and meta["inputs"][0]["datatype"] == "FP32", body[:300])
    st, _, _ = request(srv.url, "GET", "/v2/models/big/versions/1/ready")
    check("model ready (versioned)", st == 200, st)
    st, _, body = request(srv.url, "GET", "/v2/models/broken/ready")
    check("broken model not ready", st == 503, st)
    st, _, body = request(srv.url, "GET", "/v2/models/broken")
    check("broken model metadata carries its load error", st == 200 and b"error" in body, body[:200])
    st, _, body = request(srv.url, "POST", "/v2/models/broken/infer", b'{"inputs": []}')
    check("infer on broken model 503", st == 503 and b"error" in body, (st, body[:200]))
    st, _, body = request(srv.url, "GET", "/v2/models/nope")
    check("unknown model 404", st == 404 and b"error" in body, st)
    st, _, body = request(srv.url, "GET", "/v2/models/big/versions/7")
    check("unknown version 404", st == 404, st)


def test_correctness(srv, kiln, tmp, models):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    hc = th.InferenceServerClient(srv.url, network_timeout=120)
    gc = tg.InferenceServerClient(srv.grpc_url)
    check("tritonclient http live/model ready", hc.is_server_live() and hc.is_model_ready("big"))
    check("tritonclient grpc live/model ready", gc.is_server_live() and gc.is_model_ready("big"))
    gm = gc.get_model_metadata("big", as_json=True)
    check("tritonclient grpc metadata", gm["inputs"][0]["datatype"] == "FP32"
          and int(gm["inputs"][0]["shape"][0]) == -1, gm)
    rng = np.random.RandomState(7)
    for name, path, shape in models:
        meta = hc.get_model_metadata(name)
        in_name, out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
        x = rng.rand(*shape).astype(np.float32)
        ref = kiln_run(kiln, path, in_name, x, tmp)[out_name]
        # tritonclient HTTP, binary in and out (its default).
        i = th.InferInput(in_name, list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        r = hc.infer(name, [i], request_id="req-1")
        check(f"{name}: tritonclient http binary == kiln run", close(r.as_numpy(out_name), ref))
        check(f"{name}: request id echoed", r.get_response().get("id") == "req-1")
        # tritonclient HTTP, JSON in and out.
        i = th.InferInput(in_name, list(x.shape), "FP32")
        i.set_data_from_numpy(x, binary_data=False)
        r = hc.infer(name, [i], outputs=[th.InferRequestedOutput(out_name, binary_data=False)])
        check(f"{name}: tritonclient http json == kiln run", close(r.as_numpy(out_name), ref))
        # tritonclient gRPC (raw_input_contents / raw_output_contents).
        gi = tg.InferInput(in_name, list(x.shape), "FP32")
        gi.set_data_from_numpy(x)
        gr = gc.infer(name, [gi], outputs=[tg.InferRequestedOutput(out_name)])
        check(f"{name}: tritonclient grpc == kiln run", close(gr.as_numpy(out_name), ref))
        # Raw HTTP: nested JSON data.
        body = json.dumps({"id": "raw", "inputs": [{"name": in_name, "shape": list(x.shape),
                                                    "datatype": "FP32", "data": x.tolist()}]})
        st, h, data = request(srv.url, "POST", f"/v2/models/{name}/infer", body.encode(),
                              {"Content-Type": "application/json"})
        ok = st == 200
        if ok:
            out = json.loads(data)["outputs"][0]
            ok = close(np.array(out["data"]).reshape(out["shape"]), ref)
        check(f"{name}: raw http nested json == kiln run", ok, (st, data[:200]))
        # Raw HTTP: binary in, binary out.
        body, hdrs = binary_infer_body(in_name, x)
        st, h, data = request(srv.url, "POST", f"/v2/models/{name}/versions/1/infer", body, hdrs)
        ok = st == 200 and "inference-header-content-length" in h
        if ok:
            _, outs = parse_binary_response(h, data)
            ok = close(outs[out_name], ref)
        check(f"{name}: raw http binary == kiln run", ok, (st, data[:200]))
    # gRPC errors.
    from tritonclient.utils import InferenceServerException
    x = np.zeros((1, 3, 224, 224), np.float32)
    for label, model, dt, arr, want in [
        ("unknown model", "nope", "FP32", x, "NOT_FOUND"),
        ("wrong dtype", "big", "INT64", x.astype(np.int64), "INVALID_ARGUMENT"),
        ("wrong shape", "big", "FP32", np.zeros((1, 3, 5, 5), np.float32), "INVALID_ARGUMENT"),
        ("broken model", "broken", "FP32", x, "UNAVAILABLE"),
    ]:
        gi = tg.InferInput("input", list(arr.shape), dt)
        gi.set_data_from_numpy(arr)
        try:
            gc.infer(model, [gi])
            check(f"grpc {label} -> {want}", False, "no error")
        except InferenceServerException as e:
            check(f"grpc {label} -> {want}", want in str(e.status()), e.status())


def test_grpc_raw(srv, in_name, shape):
    """Malformed gRPC requests through the generated stub: all refused with a clean
    status; also checks our field numbers against tritonclient's descriptors."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as pbg

    def fields(msg):
        return [(f.name, f.number) for f in msg.DESCRIPTOR.fields]
    ours = {
        "ModelInferRequest": [("model_name", 1), ("model_version", 2), ("id", 3), ("parameters", 4),
                              ("inputs", 5), ("outputs", 6), ("raw_input_contents", 7)],
        "ModelInferResponse": [("model_name", 1), ("model_version", 2), ("id", 3), ("parameters", 4),
                               ("outputs", 5), ("raw_output_contents", 6)],
    }
    check("grpc field numbers match tritonclient's descriptors",
          all(fields(getattr(pb, k)) == v for k, v in ours.items()))
    ch = grpc.insecure_channel(srv.grpc_url)
    stub = pbg.GRPCInferenceServiceStub(ch)
    x = np.zeros(shape, np.float32).tobytes()

    def req(**kw):
        r = pb.ModelInferRequest(model_name=kw.pop("model", "tiny"))
        t = r.inputs.add()
        t.name = kw.pop("name", in_name)
        t.datatype = kw.pop("datatype", "FP32")
        t.shape.extend(kw.pop("shape", shape))
        if "contents" in kw:
            t.contents.fp32_contents.extend(kw.pop("contents"))
        for raw in kw.pop("raw", [x]):
            r.raw_input_contents.append(raw)
        for o in kw.pop("outputs", []):
            r.outputs.add().name = o
        return r

    cases = [
        ("truncated raw", req(raw=[x[:-3]]), grpc.StatusCode.INVALID_ARGUMENT),
        ("raw too long", req(raw=[x + b"1234"]), grpc.StatusCode.INVALID_ARGUMENT),
        ("two raw for one input", req(raw=[x, x]), grpc.StatusCode.INVALID_ARGUMENT),
        ("raw and contents", req(contents=[0.0]), grpc.StatusCode.INVALID_ARGUMENT),
        ("contents too short", req(raw=[], contents=[0.0] * 5), grpc.StatusCode.INVALID_ARGUMENT),
        ("no data", req(raw=[]), grpc.StatusCode.INVALID_ARGUMENT),
        ("absurd dims", req(shape=[2**40, 2**40, 3, 3]), grpc.StatusCode.INVALID_ARGUMENT),
        ("negative dim", req(shape=[-1, 3, 64, 64]), grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown datatype", req(datatype="FP99"), grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown input", req(name="nope"), grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown output", req(outputs=["nope"]), grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown model", req(model="nope"), grpc.StatusCode.NOT_FOUND),
    ]
    bad = []
    for label, r, want in cases:
        try:
            stub.ModelInfer(r, timeout=30)
            bad.append((label, "OK"))
        except grpc.RpcError as e:
            if e.code() != want:
                bad.append((label, e.code(), e.details()))
    good = req(raw=[], contents=[0.5] * int(np.prod(shape)))
    try:
        resp = stub.ModelInfer(good, timeout=30)
        typed_ok = len(resp.raw_output_contents) == 1 and resp.outputs[0].datatype == "FP32"
    except grpc.RpcError as e:
        typed_ok = False
        bad.append(("typed contents", e.code(), e.details()))
    check(f"grpc: {len(cases)} malformed requests refused with the right status", not bad, bad)
    check("grpc: typed fp32_contents input works", typed_ok)
    ch.close()


def fuzz_cases(in_name, shape, seed=1234):
    """(label, path, body bytes, headers) for malformed requests. All must be 4xx."""
    rng = random.Random(seed)
    good = {"inputs": [{"name": in_name, "shape": shape, "datatype": "FP32",
                        "data": [0.5] * int(np.prod(shape))}]}
    good_s = json.dumps(good)
    P = "/v2/models/tiny/infer"
    cases = []

    def add(label, body, headers=None, path=P):
        if isinstance(body, str):
            body = body.encode()
        cases.append((label, path, body, headers or {}))

    # Malformed JSON.
    for i in range(50):
        cut = rng.randrange(0, len(good_s) - 1)
        add(f"truncated json {i}", good_s[:cut])
    for i in range(20):
        add(f"random bytes {i}", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    for b in ["", "null", "[]", "{}", "1", '"x"', '{"inputs": null}', '{"inputs": {}}',
              '{"inputs": [1]}', '{"inputs": [{}]}', '{"inputs": [{"name": 5}]}', '{"inputs":[],"bogus":1}']:
        add(f"bad json {b!r}", b)
    # Wrong types / names / dtypes.
    def mutate(**kw):
        d = json.loads(good_s)
        d["inputs"][0].update(kw)
        return json.dumps(d)
    n = int(np.prod(shape))
    for dt in ["INT64", "FP64", "BOOL", "BYTES", "FP33", "", "fp32", "UINT8", "FP16"]:
        add(f"wrong datatype {dt}", mutate(datatype=dt))
    for nm in ["", "nope", in_name + "x", "IMAGE"]:
        add(f"unknown input {nm!r}", mutate(name=nm))
    for data in [[[[0.5] * n]], [[0.5]] * n, [0.5, [0.5] * (n - 1)], ["a"] * n, [None] * n, [True] * n, [[0.5]] * n, {"a": 1}, "abc", 5, [0.5] * (n - 1),
                 [0.5] * (n + 1), []]:
        add(f"bad data {str(data)[:20]}", mutate(data=data))
    add("missing data", mutate(data=None).replace('"data": null', '"x": 1'))
    add("no inputs", json.dumps({"inputs": []}))
    add("input twice", json.dumps({"inputs": good["inputs"] * 2}))
    add("unknown output", json.dumps({**good, "outputs": [{"name": "nope"}]}))
    add("bad binary_data_output", json.dumps({**good, "parameters": {"binary_data_output": "yes"}}))
    add("shared memory unsupported", json.dumps({**good, "parameters": {"shared_memory_region": "r"}}))
    # Absurd dims.
    for i in range(30):
        dims = [rng.choice([0, 1, 2, 3, 64, -1, -5, 10**6, 2**31, 2**40, 2**62])
                for _ in range(rng.randrange(0, 7))]
        if dims == shape:
            dims = dims + [1]
        add(f"absurd dims {dims}", mutate(shape=dims, data=[0.5] * min(n, 16)))
    add("dims not ints", mutate(shape=["a", 3]))
    add("dims float", mutate(shape=[1.5, 3, 64, 64]))
    # Binary framing.
    x = np.zeros(shape, np.float32)
    body, hdrs = binary_infer_body(in_name, x)
    hl = int(hdrs["Inference-Header-Content-Length"])
    for i in range(30):
        cut = rng.randrange(hl, len(body) - 1)
        add(f"truncated binary {i}", body[:cut], hdrs)
    add("binary header length > body", body[:hl], {**hdrs, "Inference-Header-Content-Length": str(len(body) + 10)})
    add("binary header length not a number", body, {**hdrs, "Inference-Header-Content-Length": "abc"})
    add("binary header length inside json", body, {**hdrs, "Inference-Header-Content-Length": str(hl - 5)})
    add("binary trailing bytes", body + b"\0" * 8, hdrs)
    for sz in [0, 1, x.nbytes - 4, x.nbytes + 4, -1, "a", 1.5]:
        b2, h2 = binary_infer_body(in_name, x)
        j = json.loads(b2[:hl])
        j["inputs"][0]["parameters"]["binary_data_size"] = sz
        jh = json.dumps(j).encode()
        add(f"binary_data_size {sz}", jh + x.tobytes(), {**h2, "Inference-Header-Content-Length": str(len(jh))})
    b2 = json.loads(body[:hl])
    b2["inputs"][0]["data"] = [0.5] * n
    jh = json.dumps(b2).encode()
    add("binary and data both", jh + x.tobytes(), {**hdrs, "Inference-Header-Content-Length": str(len(jh))})
    add("compressed body", good_s, {"Content-Encoding": "gzip"})
    # Unknown models and paths.
    for i in range(15):
        name = "".join(rng.choice("abcdefgh_-.") for _ in range(rng.randrange(1, 12)))
        add(f"unknown model {name}", good_s, path=f"/v2/models/{name}x/infer")
    add("unknown version", good_s, path="/v2/models/tiny/versions/9/infer")
    add("unknown endpoint", good_s, path="/v2/models/tiny/explode")
    add("bad path", good_s, path="/v3/models/tiny/infer")
    return cases


def test_bad_inputs(srv, in_name, shape):
    cases = fuzz_cases(in_name, shape)
    bad = []
    t0 = time.time()
    for label, path, body, headers in cases:
        try:
            st, _, data = request(srv.url, "POST", path, body, headers, timeout=30)
            is_json_error = True
            if st != 405:
                try:
                    is_json_error = "error" in json.loads(data)
                except ValueError:
                    is_json_error = False
            if not (400 <= st < 500) or not is_json_error:
                bad.append((label, st, data[:120]))
        except OSError as e:
            bad.append((label, "connection error", str(e)))
    check(f"bad-input suite: {len(cases)} malformed requests all answered 4xx with an error",
          len(cases) >= 200 and not bad, f"{len(bad)} bad: {bad[:5]}")
    print(f"     ({len(cases)} requests in {time.time() - t0:.1f}s)")
    # Oversize body: 413 on the declared length, without sending it.
    host, port = srv.url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n"
                  b"Content-Type: application/json\r\n\r\n{")
        resp = s.recv(4096)
    check("oversize body 413", resp.startswith(b"HTTP/1.1 413"), resp[:60])
    # Oversize body, streamed without a length (chunked): still 413.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(20):
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:
            pass
        s.settimeout(10)
        try:
            resp = s.recv(4096)
        except OSError:
            resp = b""
    check("oversize chunked body 413", resp.startswith(b"HTTP/1.1 413"), resp[:60])
    st, _, _ = request(srv.url, "GET", "/v2/health/live")
    x = np.zeros(shape, np.float32)
    body, hdrs = binary_infer_body(in_name, x)
    st2, _, _ = request(srv.url, "POST", "/v2/models/tiny/infer", body, hdrs)
    check("server healthy and serving after the bad-input suite", st == 200 and st2 == 200
          and srv.proc.poll() is None, (st, st2))


def bench_server(kiln, srv, model, *args, timeout=300):
    """`kiln bench --server ... --json`: (exit code, report dict or None, stderr)."""
    argv = [kiln, "bench", "--server", f"http://{srv.url}", "--model", model, "--json", *args]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", None, ""
    try:
        rep = json.loads(p.stdout)
    except ValueError:
        rep = None
    return p.returncode, rep, p.stderr.strip()


def load(kiln, srv, model, clients, seconds, max_requests=4000):
    """Closed-loop load with `kiln bench --server`: `clients` connections for `seconds`."""
    rc, r, err = bench_server(kiln, srv, model, "--concurrency", str(clients),
                              "--duration", str(seconds), "--max-requests", str(max_requests),
                              timeout=seconds + 120)
    if r is None:
        return {"ok": 0, "errors": 1, "rps": 0.0, "p50_ms": float("nan"),
                "p99_ms": float("nan"), "first_errors": [f"kiln bench exit {rc}: {err}"]}
    return {"ok": r["ok"], "errors": r["failed"], "rps": r["throughput_per_s"],
            "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
            "first_errors": [r["first_error"]] if r["first_error"] else []}


def batch_histogram(srv, model):
    _, _, body = request(srv.url, "GET", "/metrics")
    count = total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(f'kiln_batch_size_sum{{model="{model}"}}'):
            total = float(line.split()[-1])
        if line.startswith(f'kiln_batch_size_count{{model="{model}"}}'):
            count = float(line.split()[-1])
    return count, total


def test_load(kiln, srv, shape, clients, seconds):
    # Warm up both.
    load(kiln, srv, "big", 2, 0.5, max_requests=4)
    load(kiln, srv, "big_nb", 2, 0.5, max_requests=4)
    c0, s0 = batch_histogram(srv, "big")
    on = load(kiln, srv, "big", clients, seconds)
    c1, s1 = batch_histogram(srv, "big")
    off = load(kiln, srv, "big_nb", clients, seconds)
    mean_batch = (s1 - s0) / max(1.0, c1 - c0)
    print(f"     load: {clients} clients x {seconds}s, model input {shape}")
    print(f"     batching on : {on['rps']:.1f} req/s  p50 {on['p50_ms']:.1f} ms  p99 {on['p99_ms']:.1f} ms"
          f"  ({on['ok']} ok, {on['errors']} errors, mean batch {mean_batch:.2f})")
    print(f"     batching off: {off['rps']:.1f} req/s  p50 {off['p50_ms']:.1f} ms  p99 {off['p99_ms']:.1f} ms"
          f"  ({off['ok']} ok, {off['errors']} errors)")
    check("load with batching: no errors", on["errors"] == 0 and on["ok"] > 0, on)
    check("load without batching: no errors", off["errors"] == 0 and off["ok"] > 0, off)
    check("dynamic batching merged requests (mean batch > 1)", mean_batch > 1.0, mean_batch)


def test_bench_server(kiln, srv, seconds):
    """`kiln bench --server`: Poisson arrivals, JSON tensors, overload counted as
    429s, the count bound, and the loopback-only rule."""
    rc, r, err = bench_server(kiln, srv, "tiny", "--rate", "40", "--duration", str(seconds),
                              "--seed", "3")
    check("bench --server --rate: Poisson run with no errors",
          rc == 0 and r is not None and r["mode"] == "poisson" and r["ok"] > 0
          and r["failed"] == 0 and r["ok"] == r["sent"], (rc, r, err))
    rc, r, err = bench_server(kiln, srv, "tiny", "--tensor-format", "json", "--concurrency", "2",
                              "--duration", "60", "--max-requests", "20")
    check("bench --server: JSON tensors, stops at --max-requests",
          rc == 0 and r is not None and r["sent"] == 20 and r["ok"] == 20, (rc, r, err))
    rc, r, err = bench_server(kiln, srv, "big_q", "--concurrency", "16", "--duration",
                              str(min(seconds, 2.0)))
    e = (r or {}).get("errors", {})
    check("bench --server overload: tiny queue -> 429s counted, no other errors",
          r is not None and e.get("http_429", 0) > 0 and r["ok"] > 0
          and r["failed"] == e.get("http_429"), (rc, r, err))
    st, _, _ = request(srv.url, "GET", "/v2/models/big_q/ready")
    check("server still ready after the overload run", st == 200, st)
    for url in ("http://10.0.0.1:8000", "http://[2001:db8::1]:8000", "https://127.0.0.1:8000"):
        p = subprocess.run([kiln, "bench", "--server", url, "--model", "m", "--duration", "1"],
                           capture_output=True, text=True, timeout=60)
        check(f"bench --server {url}: refused with exit 2", p.returncode == 2
              and p.stderr.count("\n") == 1, (p.returncode, p.stderr))
    rc, r, err = bench_server(kiln, srv, "broken", "--duration", "1")
    check("bench --server on a model that failed to load: exit 1, says not ready",
          rc == 1 and "not ready" in err, (rc, err))


def test_overload_and_timeout(srv, in_name, shape):
    x = np.zeros(shape, np.float32)
    body, hdrs = binary_infer_body(in_name, x)
    results = []

    def one(_):
        t = time.perf_counter()
        st, _, data = request(srv.url, "POST", "/v2/models/big_q/infer", body, hdrs)
        return st, time.perf_counter() - t, data

    with cf.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, range(32)))
    codes = [r[0] for r in results]
    fast429 = [r[1] for r in results if r[0] == 429]
    check("overload: tiny queue gives 429s and the rest succeed",
          codes.count(429) > 0 and set(codes) <= {200, 429} and codes.count(200) > 0,
          {c: codes.count(c) for c in set(codes)})
    check("overload: 429s are fast (< 100 ms)", fast429 and max(fast429) < 0.1,
          max(fast429) if fast429 else None)
    st, _, data = request(srv.url, "POST", "/v2/models/big_to/infer", body, hdrs)
    check("request timeout -> 504 with an error", st == 504 and b"timed out" in data, (st, data[:120]))


def test_metrics(srv):
    st, h, body = request(srv.url, "GET", "/metrics")
    text = body.decode()
    want = ['kiln_requests_total{model="big",outcome="success"}', 'outcome="bad_request"',
            'outcome="queue_full"', "kiln_queue_seconds_bucket", "kiln_compute_seconds_bucket",
            "kiln_request_seconds_bucket", 'kiln_batch_size_bucket{model="big"',
            'kiln_queue_depth{model="big"}', 'kiln_model_ready{model="broken",version="1"} 0',
            'kiln_model_ready{model="big",version="1"} 1',
            'kiln_model_state{model="broken",version="1",state="UNAVAILABLE"} 1',
            'kiln_model_state{model="big",version="1",state="READY"} 1']
    missing = [w for w in want if w not in text]
    check("metrics exposition has requests, latencies, batch sizes, queue depth, model state",
          st == 200 and not missing and h.get("content-type", "").startswith("text/plain"), missing)


def test_sigterm(kiln, model_path, in_name, shape, tmp, seconds=3.0):
    srv = Server(kiln, model_path, ["--threads", "2", "--max-queue-delay-us", "2000"],
                 log=os.path.join(tmp, "sigterm.log"))
    model = os.path.basename(model_path)[:-5]
    if not check("sigterm server starts", srv.wait_live()
                 and srv.wait_models([model])[0].get(model) == "READY"):
        srv.stop(signal.SIGKILL)
        return
    x = np.zeros(shape, np.float32)
    body, hdrs = binary_infer_body(in_name, x)
    sent_at = {}
    records = []
    lock = threading.Lock()
    sig_time = [None]
    end = time.time() + seconds + 30

    def worker():
        while time.time() < end:
            t = time.time()
            if sig_time[0] is not None and t > sig_time[0]:
                return
            try:
                st, _, _ = request(srv.url, "POST", f"/v2/models/{model}/infer", body,
                                   {**hdrs, "Connection": "close"}, timeout=60)
                res = st
            except OSError as e:
                res = f"error: {e}"
            with lock:
                records.append((t, res))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    time.sleep(seconds)
    sig_time[0] = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    try:
        rc = srv.proc.wait(60)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        rc = "hung"
    for th in threads:
        th.join(90)
    srv.log.close()
    before = [r for t, r in records if t < sig_time[0] - 0.05]
    unanswered = [r for r in before if r != 200]
    check("SIGTERM during load: every request sent before the signal answered 200",
          len(before) > 0 and not unanswered, f"{len(unanswered)} of {len(before)}: {unanswered[:3]}")
    check("SIGTERM: exit code 0", rc == 0, rc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=os.path.join(REPO_ROOT, "target", "release", "kiln"))
    ap.add_argument("--model", help="a model with a symbolic batch dim (default: mobilenetv2.onnx)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="shorter load test")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 2.0
    kiln = os.path.abspath(args.kiln)
    if not os.path.exists(kiln):
        print(f"no kiln binary at {kiln}; build with cargo build --release -p kiln-cli")
        return 1
    tiny = os.path.join(REPO_ROOT, "assets", "tiny_cnn.onnx")
    big = os.path.abspath(args.model) if args.model else find_model("mobilenetv2.onnx")
    if big is None:
        print("no mobilenetv2.onnx; give --model")
        return 1
    tmp = tempfile.mkdtemp(prefix="kiln-serve-test-")
    srv = None
    try:
        repo = make_repo(tmp, big, tiny)
        srv = Server(kiln, repo, ["--threads", "2", "--max-body-mb", "16"],
                     log=os.path.join(tmp, "server.log"))
        if not check("server starts and is live", srv.wait_live()):
            return 1
        names = ["tiny", "big", "big_nb", "big_q", "big_to", "broken"]
        states, seen = srv.wait_models(names)
        print(f"     model states seen while loading: {sorted(seen)}")
        check("models settle: all READY but 'broken', which is UNAVAILABLE",
              states == {**{n: "READY" for n in names[:-1]}, "broken": "UNAVAILABLE"}, states)
        import tritonclient.http as th
        meta = th.InferenceServerClient(srv.url).get_model_metadata("big")
        big_in = meta["inputs"][0]["name"]
        big_shape = [1] + [int(d) for d in meta["inputs"][0]["shape"][1:]]
        tmeta = th.InferenceServerClient(srv.url).get_model_metadata("tiny")
        tiny_in, tiny_shape = tmeta["inputs"][0]["name"], [int(d) for d in tmeta["inputs"][0]["shape"]]

        test_health_and_metadata(srv)
        test_correctness(srv, kiln, tmp, [("tiny", tiny, tiny_shape), ("big", big, big_shape),
                                          ("big", big, [3] + big_shape[1:])])
        test_bad_inputs(srv, tiny_in, tiny_shape)
        test_grpc_raw(srv, tiny_in, tiny_shape)
        test_load(kiln, srv, big_shape, args.clients, args.seconds)
        test_bench_server(kiln, srv, args.seconds)
        test_overload_and_timeout(srv, big_in, big_shape)
        test_metrics(srv)
        rc = srv.stop()
        check("repository server: SIGTERM when idle exits 0", rc == 0, rc)
        srv = None
        test_sigterm(kiln, big, big_in, big_shape, tmp)
    except Exception as e:  # a crash in the harness is a failure, not a pass
        import traceback
        traceback.print_exc()
        check("harness ran to the end", False, repr(e))
    finally:
        if srv is not None:
            srv.stop(signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
