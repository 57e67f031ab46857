#!/usr/bin/env python3
"""Build the ONNX test models that kiln is checked against.

No model weights can be downloaded where kiln is developed, so every model
here is a real architecture (ResNet-50, MobileNetV2, BERT-base, GPT-2 small,
...) written node by node with ``onnx.helper`` and filled with seeded random
weights.  The graphs imitate what real exporters (mostly torch.onnx) emit:
shape arithmetic done at run time, LayerNorm and GELU decomposed into
primitives, small constants as ``Constant`` nodes, and so on.  That is what
kiln has to load in the wild, so that is what it is tested on.

Weights are scaled (He / Xavier-like standard deviations, damped residual
branches, LayerNorm everywhere in the transformers) so that activations stay
O(1) through every network.  That keeps the float comparison against
onnxruntime meaningful: a relative tolerance means little on values that
have exploded to 1e6 or collapsed to 1e-9.

Usage:
    make_models.py OUT_DIR [--only NAME ...] [--force] [--no-check]
    make_models.py --list

A model file that already exists and is newer than this script is skipped,
so re-running is cheap.  Each new model is checked with
``onnx.checker.check_model(full_check=True)`` before it is put in place.

Other scripts (compare_with_ort.py) import this module: ``MODELS`` is the
registry and ``ensure_models()`` builds whatever is missing.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
BOOL = TensorProto.BOOL

PRODUCER = "kiln-make-models"


# --------------------------------------------------------------------------
# Graph building helpers
# --------------------------------------------------------------------------


class GraphBuilder:
    """Accumulates nodes, initializers and graph inputs/outputs.

    Every tensor and node gets a unique name, so helpers can be called freely
    without worrying about collisions.  ``weight()`` stores a parameter as an
    initializer, or as a ``Constant`` node when ``weights_as_constants`` is
    set (some exporters do that, and runtimes must cope with both).
    ``const()`` always emits a ``Constant`` node, which is how torch.onnx
    writes small scalars and shape vectors.
    """

    def __init__(self, name: str, seed: int = 0, weights_as_constants: bool = False,
                 _parent: "GraphBuilder | None" = None):
        self.name = name
        self.weights_as_constants = weights_as_constants
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        if _parent is None:
            self.rng = np.random.default_rng(seed)
            self._tensor_names: set[str] = set()
            self._node_names: set[str] = set()
        else:
            # Subgraphs share the name spaces with their parent: ONNX forbids
            # a subgraph from shadowing a name visible from the outer scope.
            self.rng = _parent.rng
            self._tensor_names = _parent._tensor_names
            self._node_names = _parent._node_names

    # -- naming --------------------------------------------------------------

    @staticmethod
    def _unique(hint: str, used: set[str]) -> str:
        name, i = hint, 0
        while name in used:
            i += 1
            name = f"{hint}_{i}"
        used.add(name)
        return name

    def fresh(self, hint: str) -> str:
        return self._unique(hint, self._tensor_names)

    def _claim(self, name: str) -> str:
        """Reserve an exact tensor name (graph inputs/outputs need exact names)."""
        if name in self._tensor_names:
            raise ValueError(f"tensor name {name!r} used twice")
        self._tensor_names.add(name)
        return name

    # -- graph interface -------------------------------------------------------

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(self._claim(name), elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list | None) -> None:
        # The producing node must have been given out=name.
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    # -- values ----------------------------------------------------------------

    def normal(self, shape, std: float) -> np.ndarray:
        # float32 straight from the generator: twice as fast as float64 and
        # keeps the whole build well under a minute.
        a = self.rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(std)
        return a

    def weight(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        if self.weights_as_constants:
            self.nodes.append(helper.make_node(
                "Constant", [], [name], name=self._unique(f"{hint}/Constant", self._node_names),
                value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def const(self, value, dtype=np.float32, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.nodes.append(helper.make_node(
            "Constant", [], [name], name=self._unique("Constant", self._node_names),
            value=numpy_helper.from_array(np.array(value, dtype=dtype))))
        return name

    def op(self, op_type: str, inputs: list[str], *, out=None, n_out: int = 1,
           hint: str | None = None, **attrs):
        """Append a node.  Returns its output name, or a list if it has several."""
        if out is None:
            outs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        else:
            outs = [out] if isinstance(out, str) else list(out)
            for o in outs:
                self._claim(o)
        self.nodes.append(helper.make_node(
            op_type, inputs, outs, name=self._unique(hint or op_type, self._node_names), **attrs))
        return outs[0] if len(outs) == 1 else outs

    # -- finishing ---------------------------------------------------------------

    def subgraph(self, name: str) -> "GraphBuilder":
        return GraphBuilder(name, weights_as_constants=self.weights_as_constants, _parent=self)

    def graph(self) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)

    def model(self, opset: int, doc: str = "") -> onnx.ModelProto:
        opsets = [helper.make_opsetid("", opset)]
        # The lowest IR version that can carry this opset: the same choice
        # torch.onnx makes, and one every onnxruntime release accepts.
        model = helper.make_model(
            self.graph(), opset_imports=opsets, producer_name=PRODUCER, producer_version="1",
            ir_version=helper.find_min_ir_version_for(opsets), doc_string=doc)
        return model


# Small shape helpers, written the way torch.onnx traces `x.size(i)`.

def dim(g: GraphBuilder, shape: str, index: int) -> str:
    """Shape -> Gather(index) -> Unsqueeze: a 1-element int64 tensor holding one dim."""
    d = g.op("Gather", [shape, g.const(index, np.int64)], axis=0)
    return g.op("Unsqueeze", [d, g.const([0], np.int64)])


def ln_params(g: GraphBuilder, n: int) -> tuple[np.ndarray, np.ndarray]:
    # Not exactly (1, 0): a runtime that ignores gamma/beta must not pass.
    gamma = 1.0 + g.normal(n, 0.1)
    beta = g.normal(n, 0.05)
    return gamma, beta


def layer_norm_decomposed(g: GraphBuilder, x: str, gamma: str, beta: str, eps: float,
                          out: str | None = None) -> str:
    """LayerNorm over the last axis as torch.onnx writes it below opset 17."""
    mean = g.op("ReduceMean", [x], axes=[-1], keepdims=1)
    d = g.op("Sub", [x, mean])
    var = g.op("ReduceMean", [g.op("Pow", [d, g.const(2.0)])], axes=[-1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const(eps)])])
    y = g.op("Mul", [g.op("Div", [d, std]), gamma])
    return g.op("Add", [y, beta], out=out)


def gelu_erf(g: GraphBuilder, x: str) -> str:
    """0.5 * x * (1 + erf(x / sqrt(2))) in torch.onnx's node order."""
    e = g.op("Erf", [g.op("Div", [x, g.const(math.sqrt(2.0))])])
    m = g.op("Mul", [x, g.op("Add", [e, g.const(1.0)])])
    return g.op("Mul", [m, g.const(0.5)])


def gelu_tanh(g: GraphBuilder, x: str) -> str:
    """GPT-2's 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))."""
    cube = g.op("Pow", [x, g.const(3.0)])
    inner = g.op("Add", [x, g.op("Mul", [cube, g.const(0.044715)])])
    t = g.op("Tanh", [g.op("Mul", [inner, g.const(math.sqrt(2.0 / math.pi))])])
    half_x = g.op("Mul", [x, g.const(0.5)])
    return g.op("Mul", [half_x, g.op("Add", [t, g.const(1.0)])])


def relu6(g: GraphBuilder, x: str) -> str:
    # Clip with min/max as inputs (opset >= 11), as torch exports nn.ReLU6.
    return g.op("Clip", [x, g.const(0.0), g.const(6.0)])


# --------------------------------------------------------------------------
# CNNs with BatchNorm folded into the convolution (the usual torch export)
# --------------------------------------------------------------------------


def conv_folded(g: GraphBuilder, x: str, cin: int, cout: int, k: int, stride: int = 1,
                groups: int = 1, act: str | None = None, gain: float | None = None) -> str:
    """Conv with bias (BN already folded in) followed by an optional activation.

    He-style std sqrt(gain / fan_in) keeps the second moment of activations
    roughly constant from layer to layer (gain 2 in front of ReLU-like
    activations, 1 for linear projections) unless `gain` says otherwise.
    """
    if gain is None:
        gain = 1.0 if act is None else 2.0
    fan_in = (cin // groups) * k * k
    w = g.weight("conv.weight", g.normal((cout, cin // groups, k, k), math.sqrt(gain / fan_in)))
    b = g.weight("conv.bias", g.normal(cout, 0.05))
    p = k // 2
    y = g.op("Conv", [x, w, b], kernel_shape=[k, k], strides=[stride, stride],
             pads=[p, p, p, p], group=groups, dilations=[1, 1])
    if act == "relu":
        y = g.op("Relu", [y])
    elif act == "relu6":
        y = relu6(g, y)
    elif act == "hardswish":
        y = g.op("HardSwish", [y])
    else:
        assert act is None, act
    return y


def classifier(g: GraphBuilder, x: str, cin: int, classes: int, out: str) -> str:
    """GlobalAveragePool -> Flatten -> Gemm(transB=1): torch's avgpool + Linear."""
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    w = g.weight("fc.weight", g.normal((classes, cin), 1.0 / math.sqrt(cin)))
    b = g.weight("fc.bias", g.normal(classes, 0.05))
    return g.op("Gemm", [x, w, b], out=out, transB=1)


# --------------------------------------------------------------------------
# ResNet-50 v1.5
# --------------------------------------------------------------------------

BN_EPS = 1e-5


@dataclass
class ConvBN:
    weight: np.ndarray  # [cout, cin, k, k]
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """BN folded into conv weight and bias, computed in float64."""
        scale = self.gamma.astype(np.float64) / np.sqrt(self.var.astype(np.float64) + BN_EPS)
        w = self.weight.astype(np.float64) * scale[:, None, None, None]
        b = self.beta - self.mean * scale
        return w.astype(np.float32), b.astype(np.float32)


def _convbn_params(g: GraphBuilder, cin: int, cout: int, k: int, in_ms: float,
                   gamma_scale: float = 1.0) -> ConvBN:
    """Conv + BN parameters; `in_ms` is a rough mean square of the conv's input.

    The running variance is set the way training would leave it: close to
    the real variance of the conv output, sum(w_c^2) * E[x^2] per channel
    (times some noise).  With arbitrary running stats the residual stream of
    a 50-layer net drifts to rms ~10; with these every BN output is O(1).
    """
    w = g.normal((cout, cin, k, k), math.sqrt(2.0 / (cin * k * k)))
    gamma = (1.0 + g.normal(cout, 0.1)) * np.float32(gamma_scale)
    beta = g.normal(cout, 0.05)
    mean = g.normal(cout, 0.05)
    noise = g.rng.uniform(0.8, 1.25, cout)
    var = ((w.astype(np.float64) ** 2).sum(axis=(1, 2, 3)) * in_ms * noise).astype(np.float32)
    return ConvBN(w, gamma, beta, mean, var)


RESNET50_STAGES = [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]  # width, blocks, stride


def _resnet50_params(g: GraphBuilder):
    """All parameters, drawn in a fixed order so both ResNet variants are the same net.

    `ms` follows the mean square of the activations only roughly (ReLU of a
    unit-variance BN output is ~0.5, max-pooling raises it); that is enough
    to keep the running variances realistic.
    """
    stem = _convbn_params(g, 3, 64, 7, in_ms=1.0)
    ms = 1.5  # after ReLU + 3x3 max-pool
    blocks = []
    cin = 64
    for width, n, stride in RESNET50_STAGES:
        for i in range(n):
            s = stride if i == 0 else 1
            cout = width * 4
            has_down = s != 1 or cin != cout
            blocks.append(dict(
                stride=s,
                conv1=_convbn_params(g, cin, width, 1, in_ms=ms),
                conv2=_convbn_params(g, width, width, 3, in_ms=0.5),
                # Small gamma on the last BN of each residual branch (the
                # "zero-init residual" trick, softened) so 16 residual adds do
                # not grow the residual stream much.
                conv3=_convbn_params(g, width, cout, 1, in_ms=0.5, gamma_scale=0.3),
                down=_convbn_params(g, cin, cout, 1, in_ms=ms) if has_down else None,
            ))
            # relu(shortcut + branch): a fresh unit-variance shortcut after a
            # downsample, otherwise the stream grows by ~ the branch's 0.3^2.
            ms = 0.55 if has_down else ms + 0.05
            cin = cout
    fc_w = g.normal((1000, 2048), 1.0 / math.sqrt(2048))
    fc_b = g.normal(1000, 0.05)
    return stem, blocks, fc_w, fc_b


def _conv_bn(g: GraphBuilder, x: str, p: ConvBN, stride: int, fold: bool, relu: bool) -> str:
    k = p.weight.shape[2]
    pad = k // 2
    attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                 dilations=[1, 1], group=1)
    if fold:
        w, b = p.folded()
        y = g.op("Conv", [x, g.weight("conv.weight", w), g.weight("conv.bias", b)], **attrs)
    else:
        # Bias-free Conv then a separate BatchNormalization: the graph before fusion.
        y = g.op("Conv", [x, g.weight("conv.weight", p.weight)], **attrs)
        y = g.op("BatchNormalization",
                 [y, g.weight("bn.weight", p.gamma), g.weight("bn.bias", p.beta),
                  g.weight("bn.running_mean", p.mean), g.weight("bn.running_var", p.var)],
                 epsilon=BN_EPS, momentum=0.9)
    return g.op("Relu", [y]) if relu else y


def _resnet50(name: str, opset: int, fold: bool, weights_as_constants: bool) -> onnx.ModelProto:
    # Same seed for both variants: the folded/Constant model computes the
    # same function as the BN model, which is a free cross-check.
    g = GraphBuilder(name, seed=50, weights_as_constants=weights_as_constants)
    stem, blocks, fc_w, fc_b = _resnet50_params(g)
    x = g.input("input", FLOAT, ["N", 3, 224, 224])
    x = _conv_bn(g, x, stem, 2, fold, relu=True)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for b in blocks:
        # v1.5: the stride sits on the 3x3 conv, not the first 1x1.
        y = _conv_bn(g, x, b["conv1"], 1, fold, relu=True)
        y = _conv_bn(g, y, b["conv2"], b["stride"], fold, relu=True)
        y = _conv_bn(g, y, b["conv3"], 1, fold, relu=False)
        shortcut = _conv_bn(g, x, b["down"], b["stride"], fold, relu=False) if b["down"] else x
        x = g.op("Relu", [g.op("Add", [y, shortcut])])
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    g.op("Gemm", [x, g.weight("fc.weight", fc_w), g.weight("fc.bias", fc_b)],
         out="logits", transB=1)
    g.output("logits", FLOAT, ["N", 1000])
    return g.model(opset, doc="ResNet-50 v1.5, random weights")


def build_resnet50() -> onnx.ModelProto:
    return _resnet50("resnet50", opset=17, fold=False, weights_as_constants=False)


def build_resnet50_opset13_constants() -> onnx.ModelProto:
    return _resnet50("resnet50_opset13_constants", opset=13, fold=True, weights_as_constants=True)


# --------------------------------------------------------------------------
# MobileNetV2 / MobileNetV3-small-ish / tiny_cnn
# --------------------------------------------------------------------------


def inverted_residual(g: GraphBuilder, x: str, cin: int, cout: int, stride: int, hidden: int,
                      act: str = "relu6", k: int = 3, se: bool = False) -> str:
    """MobileNetV2/V3 block: 1x1 expand -> kxk depthwise (group=C) -> [SE] -> 1x1 linear project.

    The expand conv is skipped when hidden == cin (expansion factor 1).
    """
    y = x
    if hidden != cin:
        y = conv_folded(g, y, cin, hidden, 1, act=act)
    y = conv_folded(g, y, hidden, hidden, k, stride=stride, groups=hidden, act=act)
    if se:
        y = squeeze_excite(g, y, hidden)
    # SE multiplies by ~0.5 (HardSigmoid around 0); the projection makes up for it.
    y = conv_folded(g, y, hidden, cout, 1, act=None, gain=4.0 if se else 1.0)
    if stride == 1 and cin == cout:
        y = g.op("Add", [x, y])
    return y


def squeeze_excite(g: GraphBuilder, x: str, c: int) -> str:
    """GlobalAveragePool -> 1x1 Conv -> Relu -> 1x1 Conv -> HardSigmoid -> Mul (torchvision MNv3)."""
    squeeze = max(8, (c // 4 + 4) // 8 * 8)
    s = g.op("GlobalAveragePool", [x])
    s = conv_folded(g, s, c, squeeze, 1, act="relu")
    # Gain 2 although no ReLU follows: it spreads the HardSigmoid gate over
    # its useful range instead of leaving it flat at ~0.5.
    s = conv_folded(g, s, squeeze, c, 1, act=None, gain=2.0)
    # torch.nn.Hardsigmoid is relu6(x + 3) / 6, i.e. alpha=1/6, beta=0.5.
    s = g.op("HardSigmoid", [s], alpha=1.0 / 6.0, beta=0.5)
    return g.op("Mul", [x, s])


MOBILENETV2_SETTINGS = [  # expand t, channels c, repeats n, stride s
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]


def build_mobilenetv2() -> onnx.ModelProto:
    g = GraphBuilder("mobilenetv2", seed=2)
    x = g.input("input", FLOAT, ["N", 3, 224, 224])
    x = conv_folded(g, x, 3, 32, 3, stride=2, act="relu6")
    cin = 32
    for t, c, n, s in MOBILENETV2_SETTINGS:
        for i in range(n):
            x = inverted_residual(g, x, cin, c, s if i == 0 else 1, cin * t)
            cin = c
    x = conv_folded(g, x, cin, 1280, 1, act="relu6")
    classifier(g, x, 1280, 1000, out="logits")
    g.output("logits", FLOAT, ["N", 1000])
    return g.model(13, doc="MobileNetV2 1.0, random weights")


def build_mobilenetv3_small_ish() -> onnx.ModelProto:
    g = GraphBuilder("mobilenetv3_small_ish", seed=3)
    x = g.input("input", FLOAT, [1, 3, 96, 96])
    x = conv_folded(g, x, 3, 16, 3, stride=2, act="hardswish")
    # The first five blocks of MobileNetV3-small:
    #   (kernel, expanded channels, out channels, SE, activation, stride)
    blocks = [(3, 16, 16, True, "relu", 2), (3, 72, 24, False, "relu", 2),
              (3, 88, 24, False, "relu", 1), (5, 96, 40, True, "hardswish", 2),
              (5, 240, 40, True, "hardswish", 1)]
    cin = 16
    for k, hidden, cout, se, act, s in blocks:
        x = inverted_residual(g, x, cin, cout, s, hidden, act=act, k=k, se=se)
        cin = cout
    x = conv_folded(g, x, cin, 576, 1, act="hardswish")
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    w1 = g.weight("classifier.0.weight", g.normal((1024, 576), math.sqrt(4.0 / 576)))
    b1 = g.weight("classifier.0.bias", g.normal(1024, 0.05))
    x = g.op("HardSwish", [g.op("Gemm", [x, w1, b1], transB=1)])
    w2 = g.weight("classifier.3.weight", g.normal((1000, 1024), 1.0 / math.sqrt(1024)))
    b2 = g.weight("classifier.3.bias", g.normal(1000, 0.05))
    g.op("Gemm", [x, w2, b2], out="logits", transB=1)
    g.output("logits", FLOAT, [1, 1000])
    return g.model(14, doc="MobileNetV3-small-like (first five blocks), random weights")


def build_tiny_cnn() -> onnx.ModelProto:
    """Tiny MobileNetV2-style classifier, the README's default model (~100 KB).

    Deterministic: fixed seed, no timestamps, so rebuilding gives the same
    bytes (as long as numpy's PCG64 normal stream stays the same).
    """
    g = GraphBuilder("tiny_cnn", seed=10)
    x = g.input("image", FLOAT, [1, 3, 64, 64])
    x = conv_folded(g, x, 3, 16, 3, stride=2, act="relu6")        # 32x32
    for cin, cout, s in [(16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 32, 2)]:
        x = inverted_residual(g, x, cin, cout, s, cin * 4)          # -> 8x8
    x = conv_folded(g, x, 32, 128, 1, act="relu6")
    logits = classifier(g, x, 128, 10, out="logits")
    g.op("Softmax", [logits], out="probabilities", axis=1)
    g.output("probabilities", FLOAT, [1, 10])
    return g.model(13, doc="tiny MobileNetV2-style classifier, 10 classes, random weights")


# --------------------------------------------------------------------------
# BERT-base
# --------------------------------------------------------------------------

BERT = dict(layers=12, hidden=768, heads=12, ffn=3072, vocab=30522, max_pos=512, types=2, eps=1e-12)


def _linear_params(g: GraphBuilder, n_in: int, n_out: int, gain: float = 1.0):
    """Linear layer as [in, out] weight (x @ W layout) and bias.

    std gain/sqrt(fan_in) gives O(1) outputs for O(1) inputs.  With gain 1
    on Q and K the attention scores have std ~1 after the 1/sqrt(d) scale,
    so softmax is neither uniform nor one-hot: a wrong mask or scale shows.
    """
    return g.normal((n_in, n_out), gain / math.sqrt(n_in)), g.normal(n_out, 0.02)


# Q and K a bit larger than unit gain: attention in a random transformer
# drifts towards uniform in the deeper layers, and uniform attention would
# hide a wrong scale or softmax in those layers.
QK_GAIN = 1.5


def _bert_params(g: GraphBuilder) -> dict:
    """All BERT parameters in a fixed draw order (both BERT variants share them)."""
    H, F = BERT["hidden"], BERT["ffn"]
    p = dict(
        word=g.normal((BERT["vocab"], H), 0.05),
        pos=g.normal((BERT["max_pos"], H), 0.05),
        type=g.normal((BERT["types"], H), 0.05),
        emb_ln=ln_params(g, H),
        layers=[],
    )
    for _ in range(BERT["layers"]):
        p["layers"].append(dict(
            q=_linear_params(g, H, H, QK_GAIN), k=_linear_params(g, H, H, QK_GAIN),
            v=_linear_params(g, H, H),
            # Damped attention output: post-LN BERT with random weights
            # otherwise collapses all tokens onto one vector within a few layers.
            o=_linear_params(g, H, H, 0.5), ln1=ln_params(g, H),
            ffn1=_linear_params(g, H, F), ffn2=_linear_params(g, F, H), ln2=ln_params(g, H),
        ))
    p["pooler"] = _linear_params(g, H, H)
    return p


def _extended_attention_mask(g: GraphBuilder, mask: str) -> str:
    """HF's (1 - mask[:, None, None, :]) * -10000 as float."""
    m = g.op("Unsqueeze", [mask, g.const([1, 2], np.int64)])
    m = g.op("Cast", [m], to=FLOAT)
    m = g.op("Sub", [g.const(1.0), m])
    return g.op("Mul", [m, g.const(-10000.0)])


def _bert_embeddings(g: GraphBuilder, p: dict, ids: str, types: str, pos_ids: str) -> str:
    w = g.op("Gather", [g.weight("embeddings.word_embeddings.weight", p["word"]), ids], axis=0)
    t = g.op("Gather", [g.weight("embeddings.token_type_embeddings.weight", p["type"]), types], axis=0)
    pe = g.op("Gather", [g.weight("embeddings.position_embeddings.weight", p["pos"]), pos_ids], axis=0)
    return g.op("Add", [g.op("Add", [w, t]), pe])


def _bert_inputs(g: GraphBuilder) -> tuple[str, str, str]:
    ids = g.input("input_ids", INT64, ["B", "S"])
    mask = g.input("attention_mask", INT64, ["B", "S"])
    types = g.input("token_type_ids", INT64, ["B", "S"])
    H = BERT["hidden"]
    g.output("last_hidden_state", FLOAT, ["B", "S", H])
    g.output("pooler_output", FLOAT, ["B", H])
    return ids, mask, types


def build_bert_base() -> onnx.ModelProto:
    """BERT-base the way torch.onnx exports HF BertModel at opset 14.

    3-D activations [B,S,768]; dense layers are MatMul with an [in,out]
    initializer + Add; every head reshape builds its target shape from
    Shape() at run time; LayerNorm and GELU are decomposed.
    """
    g = GraphBuilder("bert_base", seed=768)
    p = _bert_params(g)
    H, heads, eps = BERT["hidden"], BERT["heads"], BERT["eps"]
    hd = H // heads
    ids, mask, types = _bert_inputs(g)

    # position_ids = self.position_ids[:, :seq_len] -- a Slice of a buffer
    # whose end comes from the input's shape.
    pos_buffer = g.weight("embeddings.position_ids", np.arange(BERT["max_pos"], dtype=np.int64)[None, :])
    seq = dim(g, g.op("Shape", [ids]), 1)
    pos_ids = g.op("Slice", [pos_buffer, g.const([0], np.int64), seq, g.const([1], np.int64)])

    def ln(x, params, out=None):
        gamma, beta = params
        return layer_norm_decomposed(g, x, g.weight("LayerNorm.weight", gamma),
                                     g.weight("LayerNorm.bias", beta), eps, out=out)

    def linear(x, params):
        w, b = params
        return g.op("Add", [g.op("MatMul", [x, g.weight("dense.weight", w)]), g.weight("dense.bias", b)])

    def split_heads(x, perm):
        shape = g.op("Shape", [x])
        target = g.op("Concat", [dim(g, shape, 0), dim(g, shape, 1),
                                 g.const([heads], np.int64), g.const([hd], np.int64)], axis=0)
        return g.op("Transpose", [g.op("Reshape", [x, target])], perm=perm)

    h = ln(_bert_embeddings(g, p, ids, types, pos_ids), p["emb_ln"])
    ext_mask = _extended_attention_mask(g, mask)

    for li, lp in enumerate(p["layers"]):
        last = li == BERT["layers"] - 1
        q = split_heads(linear(h, lp["q"]), [0, 2, 1, 3])
        k = split_heads(linear(h, lp["k"]), [0, 2, 3, 1])   # K already transposed
        v = split_heads(linear(h, lp["v"]), [0, 2, 1, 3])
        scores = g.op("Div", [g.op("MatMul", [q, k]), g.const(math.sqrt(hd))])
        probs = g.op("Softmax", [g.op("Add", [scores, ext_mask])], axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        shape = g.op("Shape", [ctx])
        merged = g.op("Concat", [dim(g, shape, 0), dim(g, shape, 1), g.const([H], np.int64)], axis=0)
        ctx = g.op("Reshape", [ctx, merged])
        h = ln(g.op("Add", [linear(ctx, lp["o"]), h]), lp["ln1"])
        f = linear(gelu_erf(g, linear(h, lp["ffn1"])), lp["ffn2"])
        h = ln(g.op("Add", [f, h]), lp["ln2"], out="last_hidden_state" if last else None)

    # Pooler: tanh(dense(h[:, 0])), the 2-D Linear exported as Gemm.
    first = g.op("Gather", [h, g.const(0, np.int64)], axis=1)
    w, b = p["pooler"]
    pooled = g.op("Gemm", [first, g.weight("pooler.dense.weight", w.T), g.weight("pooler.dense.bias", b)],
                  transB=1)
    g.op("Tanh", [pooled], out="pooler_output")
    return g.model(14, doc="BERT-base encoder (torch.onnx-style, opset 14), random weights")


def build_bert_base_opset17_ln() -> onnx.ModelProto:
    """The same BERT (same weights) in a different, equally valid layout.

    Opset 17 LayerNormalization op; hidden states kept 2-D [B*S, 768] and
    dense layers as Gemm(transB=1) on [out, in] weights; position ids via
    Range; K transposed with two Transposes; Softmax on a positive axis.
    Because the weights match bert_base, both models compute the same outputs.
    """
    g = GraphBuilder("bert_base_opset17_ln", seed=768)
    p = _bert_params(g)
    H, heads, eps = BERT["hidden"], BERT["heads"], BERT["eps"]
    hd = H // heads
    ids, mask, types = _bert_inputs(g)

    in_shape = g.op("Shape", [ids])
    batch, seq = dim(g, in_shape, 0), dim(g, in_shape, 1)
    seq_scalar = g.op("Gather", [in_shape, g.const(1, np.int64)], axis=0)
    pos_ids = g.op("Unsqueeze", [g.op("Range", [g.const(0, np.int64), seq_scalar, g.const(1, np.int64)]),
                                 g.const([0], np.int64)])
    # Shapes computed once and reused by every layer.
    heads_shape = g.op("Concat", [batch, seq, g.const([heads], np.int64), g.const([hd], np.int64)], axis=0)
    out_shape = g.op("Concat", [batch, seq, g.const([H], np.int64)], axis=0)
    flat_shape = g.const([-1, H], np.int64)

    def ln(x, params):
        gamma, beta = params
        return g.op("LayerNormalization", [x, g.weight("LayerNorm.weight", gamma),
                                           g.weight("LayerNorm.bias", beta)], axis=-1, epsilon=eps)

    def dense(x, params):
        w, b = params
        return g.op("Gemm", [x, g.weight("dense.weight", w.T), g.weight("dense.bias", b)], transB=1)

    emb = _bert_embeddings(g, p, ids, types, pos_ids)
    h = g.op("Reshape", [ln(emb, p["emb_ln"]), flat_shape])   # [B*S, H]
    ext_mask = _extended_attention_mask(g, mask)

    for lp in p["layers"]:
        q = g.op("Transpose", [g.op("Reshape", [dense(h, lp["q"]), heads_shape])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [dense(h, lp["k"]), heads_shape])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [k], perm=[0, 1, 3, 2])
        v = g.op("Transpose", [g.op("Reshape", [dense(h, lp["v"]), heads_shape])], perm=[0, 2, 1, 3])
        scores = g.op("Div", [g.op("MatMul", [q, k]), g.const(math.sqrt(hd))])
        probs = g.op("Softmax", [g.op("Add", [scores, ext_mask])], axis=3)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, flat_shape])
        h = ln(g.op("Add", [dense(ctx, lp["o"]), h]), lp["ln1"])
        f = dense(gelu_erf(g, dense(h, lp["ffn1"])), lp["ffn2"])
        h = ln(g.op("Add", [f, h]), lp["ln2"])

    h = g.op("Reshape", [h, out_shape], out="last_hidden_state")
    first = g.op("Gather", [h, g.const(0, np.int64)], axis=1)
    pooled = dense(first, p["pooler"])
    g.op("Tanh", [pooled], out="pooler_output")
    return g.model(17, doc="BERT-base encoder (LayerNormalization, Gemm layout, opset 17), random weights")


# --------------------------------------------------------------------------
# GPT-2 small
# --------------------------------------------------------------------------

GPT2 = dict(layers=12, hidden=768, heads=12, vocab=50257, n_ctx=1024, eps=1e-5)


def build_gpt2_small() -> onnx.ModelProto:
    """GPT-2 small LM forward as torch.onnx exports HF GPT2LMHeadModel (opset 15).

    Pre-LN blocks, fused QKV split with a `split` input, causal mask sliced
    out of a [1,1,1024,1024] bool buffer by the run-time sequence length and
    applied with Where(mask, scores, float32 min), tanh-GELU, LM head tied
    to the token embedding through a Transpose of the same initializer.
    """
    g = GraphBuilder("gpt2_small", seed=124)
    H, heads, L, eps = GPT2["hidden"], GPT2["heads"], GPT2["layers"], GPT2["eps"]
    hd = H // heads
    ids = g.input("input_ids", INT64, ["B", "S"])
    g.output("logits", FLOAT, ["B", "S", GPT2["vocab"]])

    # std 0.02 (GPT-2's own init) also sets the logit scale through the tied
    # head: logits ~ N(0, 768 * 0.02^2) ~ 0.55.  Larger logits only inflate
    # the absolute float error against the comparison's 1e-5 floor.
    wte = g.weight("transformer.wte.weight", g.normal((GPT2["vocab"], H), 0.02))
    wpe = g.weight("transformer.wpe.weight", g.normal((GPT2["n_ctx"], H), 0.02))
    causal = np.tril(np.ones((GPT2["n_ctx"], GPT2["n_ctx"]), dtype=bool))[None, None]
    bias = g.weight("attn.bias", causal)  # one buffer shared by all layers

    shape = g.op("Shape", [ids])
    batch, seq = dim(g, shape, 0), dim(g, shape, 1)
    seq_scalar = g.op("Gather", [shape, g.const(1, np.int64)], axis=0)
    pos = g.op("Unsqueeze", [g.op("Range", [g.const(0, np.int64), seq_scalar, g.const(1, np.int64)]),
                             g.const([0], np.int64)])
    h = g.op("Add", [g.op("Gather", [wte, ids], axis=0), g.op("Gather", [wpe, pos], axis=0)])

    # bias[:, :, key_len - query_len : key_len, :key_len]; here key_len == query_len == S.
    start = g.op("Sub", [seq, seq])
    mask = g.op("Slice", [bias, start, seq, g.const([2], np.int64), g.const([1], np.int64)])
    mask = g.op("Slice", [mask, g.const([0], np.int64), seq, g.const([3], np.int64), g.const([1], np.int64)])
    mask_value = g.const(np.finfo(np.float32).min)

    heads_shape = g.op("Concat", [batch, seq, g.const([heads], np.int64), g.const([hd], np.int64)], axis=0)
    merged_shape = g.op("Concat", [batch, seq, g.const([H], np.int64)], axis=0)

    def ln(x, out=None):
        gamma, beta = ln_params(g, H)
        return layer_norm_decomposed(g, x, g.weight("ln.weight", gamma), g.weight("ln.bias", beta),
                                     eps, out=out)

    def conv1d(x, n_in, n_out, gain=1.0, qk_columns=0):
        # HF Conv1D is x @ W + b with W stored [in, out]: MatMul + Add.
        w = g.normal((n_in, n_out), gain / math.sqrt(n_in))
        w[:, :qk_columns] *= np.float32(QK_GAIN)  # sharper attention, as in BERT
        w = g.weight("weight", w)
        return g.op("Add", [g.op("MatMul", [x, w]), g.weight("bias", g.normal(n_out, 0.02))])

    # Output projections are damped by 1/sqrt(2 * layers) (GPT-2's own init
    # rule) so the residual stream grows slowly over 24 residual adds.
    proj_gain = 1.0 / math.sqrt(2 * L)
    for _ in range(L):
        qkv = conv1d(ln(h), H, 3 * H, qk_columns=2 * H)
        q, k, v = g.op("Split", [qkv, g.const([H, H, H], np.int64)], n_out=3, axis=2)
        q = g.op("Transpose", [g.op("Reshape", [q, heads_shape])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, heads_shape])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [v, heads_shape])], perm=[0, 2, 1, 3])
        w = g.op("Div", [g.op("MatMul", [q, k]), g.const(math.sqrt(hd))])
        w = g.op("Softmax", [g.op("Where", [mask, w, mask_value])], axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [w, v])], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merged_shape])
        h = g.op("Add", [conv1d(ctx, H, H, proj_gain), h])
        f = conv1d(gelu_tanh(g, conv1d(ln(h), H, 4 * H)), 4 * H, H, proj_gain)
        h = g.op("Add", [f, h])

    h = ln(h)
    g.op("MatMul", [h, g.op("Transpose", [wte], perm=[1, 0])], out="logits")
    return g.model(15, doc="GPT-2 small LM forward (torch.onnx-style, opset 15), random weights")


# --------------------------------------------------------------------------
# Recurrent + control flow
# --------------------------------------------------------------------------


def build_lstm_if() -> onnx.ModelProto:
    """Bidirectional LSTM followed by a data-dependent If.

    Both If branches read outer-scope values: a tensor produced by an outer
    node (the LSTM's states / features) and an outer initializer.  The branch
    is chosen by sign(sum(X)), so different inputs exercise both sides.
    """
    g = GraphBuilder("lstm_if", seed=14)
    I, Hd, heads_out = 16, 32, 8
    x = g.input("X", FLOAT, ["S", "B", I])
    h0 = g.input("initial_h", FLOAT, [2, "B", Hd])
    c0 = g.input("initial_c", FLOAT, [2, "B", Hd])

    w = g.weight("lstm.W", g.normal((2, 4 * Hd, I), 1.0 / math.sqrt(I)))
    r = g.weight("lstm.R", g.normal((2, 4 * Hd, Hd), 1.0 / math.sqrt(Hd)))
    b = g.weight("lstm.B", g.normal((2, 8 * Hd), 0.1))
    # sequence_lens omitted (empty name): every batch entry runs the full length.
    y, y_h, y_c = g.op("LSTM", [x, w, r, b, "", h0, c0], out=["Y", "Y_h", "Y_c"],
                       hidden_size=Hd, direction="bidirectional")
    g.output("Y", FLOAT, ["S", 2, "B", Hd])
    g.output("Y_h", FLOAT, [2, "B", Hd])

    # [2, B, H] -> [B, 2H]: forward and backward final states side by side.
    feat = g.op("Reshape", [g.op("Transpose", [y_h], perm=[1, 0, 2]), g.const([0, -1], np.int64)])
    cond = g.op("Greater", [g.op("ReduceSum", [x], keepdims=0), g.const(0.0)])

    w_then = g.weight("then.weight", g.normal((2 * Hd, heads_out), 1.0 / math.sqrt(2 * Hd)))
    b_then = g.weight("then.bias", g.normal(heads_out, 0.1))
    w_else = g.weight("else.weight", g.normal((2 * Hd, heads_out), 1.0 / math.sqrt(2 * Hd)))
    scale = g.weight("else.scale", 1.0 + g.normal(Hd, 0.2))

    then_g = g.subgraph("then_branch")
    then_g.op("Tanh", [then_g.op("Add", [then_g.op("MatMul", [feat, w_then]), b_then])], out="then_head")
    then_g.op("Add", [y_h, y_c], out="then_summary")
    then_g.output("then_head", FLOAT, None)
    then_g.output("then_summary", FLOAT, None)

    else_g = g.subgraph("else_branch")
    else_g.op("Sigmoid", [else_g.op("MatMul", [feat, w_else])], out="else_head")
    else_g.op("Mul", [y_c, scale], out="else_summary")
    else_g.output("else_head", FLOAT, None)
    else_g.output("else_summary", FLOAT, None)

    g.op("If", [cond], out=["head", "state_summary"],
         then_branch=then_g.graph(), else_branch=else_g.graph())
    g.output("head", FLOAT, ["B", heads_out])
    g.output("state_summary", FLOAT, [2, "B", Hd])
    return g.model(14, doc="bidirectional LSTM + data-dependent If, random weights")


# --------------------------------------------------------------------------
# A grab bag of operators
# --------------------------------------------------------------------------


def build_mixed_ops() -> onnx.ModelProto:
    """Small graph touching many operators that the big models do not.

    Comparisons that pick elements (Greater, Where, ...) only look at graph
    inputs, never at computed floats: a value a hair from the threshold could
    flip between runtimes and turn a 1e-7 difference into a spurious failure.
    """
    g = GraphBuilder("mixed_ops", seed=18)
    i64 = np.int64
    x = g.input("x", FLOAT, [1, 3, 16, 16])
    gate = g.input("gate", FLOAT, [1, 1, 18, 18])

    # Pad(reflect) -> ConvTranspose -> LeakyRelu -> AveragePool(pads) -> MaxPool(dilations)
    y = g.op("Pad", [x, g.const([0, 0, 2, 2, 0, 0, 2, 2], i64)], mode="reflect")          # 1x3x20x20
    wt = g.weight("deconv.weight", g.normal((3, 4, 3, 3), math.sqrt(2.0 / 27)))
    bt = g.weight("deconv.bias", g.normal(4, 0.05))
    y = g.op("ConvTranspose", [y, wt, bt], kernel_shape=[3, 3], strides=[2, 2],
             pads=[1, 1, 1, 1], output_padding=[1, 1])                                   # 1x4x40x40
    y = g.op("LeakyRelu", [y], alpha=0.1)
    y = g.op("AveragePool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
             count_include_pad=0)                                                        # 1x4x20x20
    feat = g.op("MaxPool", [y], kernel_shape=[2, 2], dilations=[2, 2], strides=[1, 1])   # 1x4x18x18

    # Resize both ways: upsample with half_pixel, non-uniform downsample with align_corners.
    g.op("Resize", [feat, "", "", g.const([1, 4, 27, 27], i64)], out="resized_half_pixel",
         mode="linear", coordinate_transformation_mode="half_pixel")
    g.op("Resize", [feat, "", "", g.const([1, 4, 7, 11], i64)], out="resized_align_corners",
         mode="linear", coordinate_transformation_mode="align_corners")

    # Unary chain on a bounded range: Sigmoid -> Exp -> Sqrt -> Reciprocal -> Pow.
    u = g.op("Reciprocal", [g.op("Sqrt", [g.op("Exp", [g.op("Sigmoid", [feat])])])])
    u = g.op("Pow", [u, g.const(2.5)])

    # GlobalMaxPool -> Flatten -> Gemm(alpha, beta, transB) -> Softmax(axis=1).
    v = g.op("Flatten", [g.op("GlobalMaxPool", [u])], axis=1)                            # 1x4
    wg = g.weight("gemm.weight", g.normal((6, 4), 2.0))
    bg = g.weight("gemm.bias", g.normal((1, 6), 0.5))
    logits = g.op("Gemm", [v, wg, bg], alpha=0.5, beta=2.0, transB=1)                     # 1x6
    g.op("Softmax", [logits], out="probs", axis=1)

    # Masks from shape arithmetic: Shape/Gather -> Range, ConstantOfShape -> Trilu -> Cast(bool).
    n = g.op("Gather", [g.op("Shape", [feat]), g.const(2, i64)], axis=0)                 # scalar 18
    n1 = g.op("Unsqueeze", [n, g.const([0], i64)])
    ones = g.op("ConstantOfShape", [g.op("Concat", [n1, n1], axis=0)],
                value=numpy_helper.from_array(np.array([1.0], np.float32)))
    upper = g.op("Cast", [g.op("Trilu", [ones, g.const(1, i64)], upper=1)], to=BOOL)    # col > row
    idx = g.op("Range", [g.const(0, i64), n, g.const(1, i64)])
    row_lt_col = g.op("Less", [g.op("Unsqueeze", [idx, g.const([1], i64)]),
                               g.op("Unsqueeze", [idx, g.const([0], i64)])])
    agree = g.op("Equal", [upper, row_lt_col])                                           # all true
    lower = g.op("Not", [upper])
    open_gate = g.op("Greater", [gate, g.const(0.0)])
    mask = g.op("And", [g.op("And", [open_gate, lower]), agree], out="mask")          # 1x1x18x18
    g.output("mask", BOOL, [1, 1, 18, 18])

    fill = g.op("Expand", [g.const([-1.0]), g.op("Shape", [feat])])
    masked = g.op("Where", [mask, feat, fill], out="masked")
    g.output("masked", FLOAT, [1, 4, 18, 18])
    g.op("ReduceSum", [g.op("Cast", [mask], to=INT64), g.const([2, 3], i64)], out="mask_count",
         keepdims=0)
    g.output("mask_count", INT64, [1, 1])

    # Statistics: Size/Cast/Reciprocal for a mean, ReduceMax and Squeeze with axes inputs.
    inv_size = g.op("Reciprocal", [g.op("Cast", [g.op("Size", [masked])], to=FLOAT)])
    total = g.op("ReduceSum", [masked, g.const([1, 2, 3], i64)], keepdims=0)              # [1]
    mean = g.op("Unsqueeze", [g.op("Mul", [total, inv_size]), g.const([1], i64)])       # 1x1
    peak = g.op("Squeeze", [g.op("ReduceMax", [masked, g.const([2, 3], i64)], keepdims=1),
                            g.const([2, 3], i64)])                                        # 1x4
    g.op("Concat", [peak, logits, mean], out="stats", axis=1)                             # 1x11
    g.output("stats", FLOAT, [1, 11])

    # Slice with negative steps (and an INT64_MIN end) then Gather with negative indices.
    rev = g.op("Slice", [u, g.const([-1, -2], i64), g.const([np.iinfo(np.int64).min, 0], i64),
                         g.const([3, 2], i64), g.const([-1, -3], i64)])                    # 1x4x6x18
    picked = g.op("Gather", [rev, g.const([-1, 0, -3], i64)], axis=1)                      # 1x3x6x18
    g.op("Identity", [picked], out="gathered_reversed")
    g.output("gathered_reversed", FLOAT, [1, 3, 6, 18])

    g.output("resized_half_pixel", FLOAT, [1, 4, 27, 27])
    g.output("resized_align_corners", FLOAT, [1, 4, 7, 11])
    g.output("probs", FLOAT, [1, 6])
    return g.model(18, doc="operator grab bag, random weights")


# --------------------------------------------------------------------------
# Registry and driver
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], onnx.ModelProto]
    # Concrete values for the symbolic dims when a test needs real inputs.
    test_dims: dict


MODELS: dict[str, ModelSpec] = {
    "tiny_cnn": ModelSpec(build_tiny_cnn, {}),
    "mixed_ops": ModelSpec(build_mixed_ops, {}),
    "lstm_if": ModelSpec(build_lstm_if, {"S": 24, "B": 2}),
    "mobilenetv3_small_ish": ModelSpec(build_mobilenetv3_small_ish, {}),
    "mobilenetv2": ModelSpec(build_mobilenetv2, {"N": 1}),
    "resnet50": ModelSpec(build_resnet50, {"N": 1}),
    "resnet50_opset13_constants": ModelSpec(build_resnet50_opset13_constants, {"N": 1}),
    "bert_base": ModelSpec(build_bert_base, {"B": 1, "S": 128}),
    "bert_base_opset17_ln": ModelSpec(build_bert_base_opset17_ln, {"B": 1, "S": 128}),
    "gpt2_small": ModelSpec(build_gpt2_small, {"B": 1, "S": 128}),
}


def model_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.onnx"


def is_fresh(path: Path) -> bool:
    """Up to date: exists and is newer than this script (the models' source)."""
    try:
        return path.stat().st_mtime > Path(__file__).stat().st_mtime
    except FileNotFoundError:
        return False


def build_one(name: str, out_dir: Path, check: bool = True) -> Path:
    """Build, check and atomically write one model; returns its path."""
    path = model_path(out_dir, name)
    model = MODELS[name].build()
    # Write under a temporary name and rename at the end: an interrupted run
    # must never leave a truncated file that looks "fresh" to the next one.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        onnx.save(model, tmp)
        if check:
            # Checking the file (not the proto) spares a re-serialisation of
            # the 500 MB models; full_check adds strict shape inference.
            onnx.checker.check_model(str(tmp), full_check=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def ensure_models(out_dir, names=None, check: bool = True, force: bool = False,
                  log=print) -> dict[str, Path]:
    """Build the named models (default: all) that are missing or stale."""
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names or MODELS:
        if name not in MODELS:
            raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        path = model_path(out_dir, name)
        if not force and is_fresh(path):
            log(f"skip  {name} (up to date)")
        else:
            t0 = time.perf_counter()
            build_one(name, out_dir, check=check)
            log(f"built {name}: {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")
        paths[name] = path
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", help="directory to write NAME.onnx files into")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="build only these models")
    ap.add_argument("--list", action="store_true", help="list model names and exit")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--no-check", action="store_true", help="skip onnx.checker (faster)")
    args = ap.parse_args(argv)

    if args.list:
        for name in MODELS:
            print(name)
        return 0
    if not args.out_dir:
        ap.error("OUT_DIR is required (unless --list)")
    unknown = [n for n in args.only or [] if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(MODELS)}")

    t0 = time.perf_counter()
    ensure_models(args.out_dir, args.only, check=not args.no_check, force=args.force)
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
