"""Graphs as exporters other than PyTorch's write them: tf2onnx (TensorFlow/Keras) and paddle2onnx.

No TensorFlow or Paddle is needed: every graph is written node by node with ``onnx.helper``,
in the shapes, op choices and naming those converters produce, with deterministic random
weights from ``seed``. Each builder returns an ``onnx.ModelProto`` that passes the ONNX
checker and shape inference and runs in ONNX Runtime.

What tf2onnx writes for a Keras model (NHWC):

* an NHWC input (``input_1``, batch ``unk__*``; spatial dims ``unk__*`` too when the Keras
  input was ``(None, None, 3)``);
* ``Transpose(perm 0,3,1,2)`` before and ``Transpose(0,2,3,1)`` after every Conv/pool
  (``transposes="per_op"``), or, after tf2onnx's transpose optimiser, one pair around the
  whole backbone (``transposes="once"``);
* ``padding='same'``: explicit ``pads`` (TF's asymmetric SAME, the extra pixel at the end)
  when shapes are known, ``auto_pad=SAME_UPPER`` when they are not; Keras ``ZeroPadding2D``
  as a ``Pad`` node (mode constant, pads as an int64 initializer, in NHWC axis order) before
  a ``padding='valid'`` conv; atrous convs (SpaceToBatchND/BatchToSpaceND) collapsed into a
  Conv with ``dilations`` and explicit pads;
* inference BatchNorm folded by grappler into ``Mul``/``Add`` with per-channel constants
  (shape ``(C,)`` broadcasting over NHWC, or ``(C,1,1)`` once transposed away);
* ``ReLU6`` as ``Clip(x, 0, 6)`` with min/max as scalar initializers, LeakyReLU(0.1);
* heads: ``ReduceMean`` over axes [1, 2] (keepdims 1 then a 1x1 Conv and ``Reshape`` to
  ``[-1, classes]`` as Keras' MobileNet does; or ``GlobalAveragePool`` + ``Squeeze``), then
  ``MatMul`` + ``Add`` + ``Softmax``; ``UpSampling2D`` as ``Resize`` (nearest, asymmetric)
  whose ``sizes`` are ``Concat(Shape(x)[0:2], constant)``; tensor names ending in ``:0``.

What paddle2onnx writes (NCHW):

* input ``x`` with batch ``-1`` (a ``dim_param``), ``Conv`` with symmetric explicit pads then
  ``BatchNormalization`` (epsilon 1e-5), PaddleClas parameter names (``conv1_weights``,
  ``conv1_bn_scale``, ``conv1_bn_offset``, ``conv1_bn_mean``, ``conv1_bn_variance``);
* ``HardSwish`` (opset >= 14) or ``x * Clip(x + 3, 0, 6) / 6`` below, ``HardSigmoid``
  (slope 0.2, offset 0.5) in squeeze-and-excitation blocks (``GlobalAveragePool -> Conv ->
  Relu -> Conv -> HardSigmoid -> Mul``), ``Clip`` as ReLU6 with min/max from ``Constant``
  nodes, ``Reshape`` targets from ``Constant`` nodes (``[0, -1]``), dropout as ``Identity``,
  a ``MatMul`` + ``Add`` + ``Softmax`` head; node names ``p2o.Conv.0``, tensors
  ``conv2d_0.tmp_0``.

Models (:data:`MODELS`): ``tf_mobilenet_v1`` (classifier), ``tf_mobilenet_v2`` (classifier,
dynamic spatial input, ``auto_pad``), ``tf_segmenter`` (fully convolutional, DeepLab-like,
dynamic spatial input; ``image_pooling=True`` adds the ASPP image-level branch),
``tf_yolo_tiny`` (detector: backbone, FPN/YOLO neck with upsampling and concat, two heads;
:data:`YOLO_BACKBONE` names its backbone features for ``--outputs``) and
``paddle_mobilenet_v3`` (classifier with SE blocks at strides 4 and 8).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "MODELS",
    "YOLO_BACKBONE",
    "build",
    "paddle_mobilenet_v3",
    "tf_mobilenet_v1",
    "tf_mobilenet_v2",
    "tf_segmenter",
    "tf_yolo_tiny",
]


class _Graph:
    """Nodes, initializers and a static shape per tensor (computed here, for SAME pads)."""

    def __init__(self, seed: int, opset: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._used: set[str] = set()
        self._counts: dict[str, int] = {}

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def count(self, op: str) -> int:
        n = self._counts.get(op, 0)
        self._counts[op] = n + 1
        return n

    # weights ------------------------------------------------------------------------------

    def init(self, name: str, array: np.ndarray) -> str:
        name = self.unique(name)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def conv_weight(self, name: str, shape: tuple[int, ...]) -> str:
        fan_in = math.prod(shape[1:])
        return self.init(name, (self.rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32))

    def dense_weight(self, name: str, fan_in: int, fan_out: int) -> str:
        """A (fan_in, fan_out) MatMul weight, Glorot-uniform like Keras' Dense and Paddle's Linear."""
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return self.init(name, self.rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32))

    def vector(self, name: str, n: int, kind: str, shape: tuple[int, ...] | None = None) -> str:
        if kind == "scale":
            a = self.rng.uniform(0.5, 1.5, n)
        elif kind == "var":
            a = self.rng.uniform(0.5, 2.0, n)
        else:  # bias, offset, mean
            a = 0.1 * self.rng.standard_normal(n)
        return self.init(name, a.astype(np.float32).reshape(shape or (n,)))

    # nodes --------------------------------------------------------------------------------

    def node(self, op: str, inputs: Sequence[str], name: str, output: str | None = None, shape=None, **attrs) -> str:
        out = self.unique(output or f"{name}:0")
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.unique(name), **attrs))
        if shape is not None:
            self.shapes[out] = tuple(shape)
        elif inputs and inputs[0] in self.shapes:
            self.shapes[out] = self.shapes[inputs[0]]
        return out

    def constant_node(self, name: str, array: np.ndarray) -> str:
        """paddle2onnx style: a Constant node, not an initializer."""
        out = self.unique(f"{name}.tmp_0")
        tensor = numpy_helper.from_array(np.asarray(array), out)
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.unique(name), value=tensor))
        return out

    def model(self, inputs, outputs, name: str, producer: tuple[str, str], ir_version: int = 8) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name=producer[0],
            producer_version=producer[1],
        )
        model.ir_version = ir_version
        onnx.checker.check_model(model, full_check=True)
        return model


def _same_pads(size: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding as tf2onnx writes it: the odd pixel at the end."""
    out = -(-size // s)
    total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def _conv_out(size: int, k: int, s: int, d: int, pb: int, pe: int) -> int:
    return (size + pb + pe - d * (k - 1) - 1) // s + 1


# ================================================================================ tf2onnx


class _TF(_Graph):
    """tf2onnx's output for a Keras model; tensors are NHWC between ops unless ``once``."""

    def __init__(self, seed: int, opset: int, transposes: str, same: str, scope: str, bn_rank4: bool = False) -> None:
        super().__init__(seed, opset)
        self.bn_rank4 = bn_rank4
        if transposes not in ("per_op", "once"):
            raise ValueError(f"transposes must be 'per_op' or 'once', got {transposes!r}")
        if same not in ("explicit", "auto"):
            raise ValueError(f"same must be 'explicit' or 'auto', got {same!r}")
        self.per_op = transposes == "per_op"
        self.same = same
        self.scope = scope
        self._t = 0

    def path(self, layer: str, op: str) -> str:
        return f"StatefulPartitionedCall/{self.scope}/{layer}/{op}"

    def channels(self, x: str) -> int:
        return self.shapes[x][3] if self.per_op else self.shapes[x][1]

    def spatial(self, x: str) -> tuple[int, int]:
        s = self.shapes[x]
        return (s[1], s[2]) if self.per_op else (s[2], s[3])

    def _with_layout(self, x: str, n: int, h: int, w: int, c: int) -> tuple[int, ...]:
        return (n, h, w, c) if self.per_op else (n, c, h, w)

    def transpose(self, x: str, perm: Sequence[int], base: str) -> str:
        self._t += 1
        s = self.shapes[x]
        return self.node("Transpose", [x], f"{base}__{self._t}", shape=tuple(s[p] for p in perm), perm=list(perm))

    def to_nchw(self, x: str, base: str) -> str:
        return self.transpose(x, (0, 3, 1, 2), base)

    def to_nhwc(self, x: str, base: str) -> str:
        return self.transpose(x, (0, 2, 3, 1), base)

    def enter(self, x: str) -> str:
        """``once``: the backbone's single leading Transpose (a no-op for ``per_op``)."""
        return x if self.per_op else self.to_nchw(x, self.path("backbone", "transpose_in"))

    def leave(self, x: str) -> str:
        return x if self.per_op else self.to_nhwc(x, self.path("backbone", "transpose_out"))

    def _window_pads(self, x: str, node_name: str, k: int, s: int, d: int, padding: str, attrs: dict) -> tuple[int, int, int, int]:
        h, w = self.spatial(x)
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            (t, b), (l, r) = _same_pads(h, k, s, d), _same_pads(w, k, s, d)
            pads = (t, l, b, r)
            if self.same == "auto":
                attrs["auto_pad"] = "SAME_UPPER"
            elif any(pads):
                attrs["pads"] = list(pads)
        else:
            raise ValueError(padding)
        return pads

    def conv(
        self, x: str, layer: str, cout: int, k: int = 3, s: int = 1, padding: str = "same", d: int = 1,
        depthwise: bool = False, bias: bool = False,
    ) -> str:
        """Keras Conv2D / DepthwiseConv2D; ``padding='same'|'valid'`` or explicit atrous pads."""
        cin = self.channels(x)
        name = self.path(layer, "depthwise" if depthwise else "Conv2D")
        attrs: dict = {"kernel_shape": [k, k]}
        if s > 1:
            attrs["strides"] = [s, s]
        if d > 1:
            attrs["dilations"] = [d, d]
            padding = "atrous"
        if padding == "atrous":  # tf2onnx folds SpaceToBatchND/BatchToSpaceND: explicit pads
            p = d * (k - 1) // 2
            pads = (p, p, p, p)
            attrs["pads"] = list(pads)
        else:
            pads = self._window_pads(x, name, k, s, d, padding, attrs)
        if depthwise:
            attrs["group"] = cin
            cout = cin
        weight = self.conv_weight(f"{self.path(layer, 'ReadVariableOp')}:0", (cout, 1 if depthwise else cin, k, k))
        inputs = [self.to_nchw(x, name) if self.per_op else x, weight]
        if bias:
            inputs.append(self.vector(f"{self.path(layer, 'BiasAdd/ReadVariableOp')}:0", cout, "bias"))
        h, w = self.spatial(x)
        oh = _conv_out(h, k, s, d, pads[0], pads[2])
        ow = _conv_out(w, k, s, d, pads[1], pads[3])
        n = self.shapes[x][0]
        y = self.node("Conv", inputs, name, shape=(n, cout, oh, ow), **attrs)
        return self.to_nhwc(y, name) if self.per_op else y

    def max_pool(self, x: str, layer: str, k: int, s: int, padding: str = "same") -> str:
        name = self.path(layer, "MaxPool")
        attrs: dict = {"kernel_shape": [k, k], "strides": [s, s]}
        pads = self._window_pads(x, name, k, s, 1, padding, attrs)
        h, w = self.spatial(x)
        n, c = self.shapes[x][0], self.channels(x)
        shape = (n, c, _conv_out(h, k, s, 1, pads[0], pads[2]), _conv_out(w, k, s, 1, pads[1], pads[3]))
        y = self.node("MaxPool", [self.to_nchw(x, name) if self.per_op else x], name, shape=shape, **attrs)
        return self.to_nhwc(y, name) if self.per_op else y

    def zero_pad(self, x: str, layer: str, top: int, bottom: int, left: int, right: int) -> str:
        """Keras ZeroPadding2D: a Pad node in the tensor's own layout."""
        if self.per_op:
            pads = [0, top, left, 0, 0, bottom, right, 0]
        else:
            pads = [0, 0, top, left, 0, 0, bottom, right]
        amounts = self.init(f"{self.path(layer, 'Pad/paddings')}:0", np.array(pads, np.int64))
        n, c = self.shapes[x][0], self.channels(x)
        h, w = self.spatial(x)
        shape = self._with_layout(x, n, h + top + bottom, w + left + right, c)
        return self.node("Pad", [x, amounts], self.path(layer, "Pad"), shape=shape, mode="constant")

    def batch_norm(self, x: str, layer: str) -> str:
        """Inference BatchNorm folded by grappler into Mul + Add."""
        c = self.channels(x)
        if self.per_op:
            shape = (1, 1, 1, c) if self.bn_rank4 else (c,)
        else:
            shape = (c, 1, 1)
        scale = self.vector(f"{self.path(layer, 'FusedBatchNormV3/Mul/y')}:0", c, "scale", shape)
        offset = self.vector(f"{self.path(layer, 'FusedBatchNormV3/Add/y')}:0", c, "offset", shape)
        y = self.node("Mul", [x, scale], self.path(layer, "FusedBatchNormV3/Mul"))
        return self.node("Add", [y, offset], self.path(layer, "FusedBatchNormV3"))

    def relu6(self, x: str, layer: str) -> str:
        lo = self.init(f"{self.path(layer, 'Relu6__min')}:0", np.array(0.0, np.float32))
        hi = self.init(f"{self.path(layer, 'Relu6__max')}:0", np.array(6.0, np.float32))
        return self.node("Clip", [x, lo, hi], self.path(layer, "Relu6"))

    def relu(self, x: str, layer: str) -> str:
        return self.node("Relu", [x], self.path(layer, "Relu"))

    def leaky(self, x: str, layer: str) -> str:
        return self.node("LeakyRelu", [x], self.path(layer, "LeakyRelu"), alpha=0.1)

    def concat(self, xs: Sequence[str], layer: str) -> str:
        axis = 3 if self.per_op else 1
        shape = list(self.shapes[xs[0]])
        shape[axis] = sum(self.shapes[v][axis] for v in xs)
        return self.node("Concat", list(xs), self.path(layer, "concat"), shape=shape, axis=axis)

    def add(self, a: str, b: str, layer: str) -> str:
        return self.node("Add", [a, b], self.path(layer, "add"))

    def hard_sigmoid(self, x: str, layer: str) -> str:
        """Keras' hard_sigmoid, ReLU6(x + 3) / 6, as tf2onnx writes it."""
        three = self.init(f"{self.path(layer, 'add/y')}:0", np.array(3.0, np.float32))
        y = self.node("Add", [x, three], self.path(layer, "add"))
        y = self.relu6(y, layer)
        sixth = self.init(f"{self.path(layer, 'mul/y')}:0", np.array(1 / 6, np.float32))
        return self.node("Mul", [y, sixth], self.path(layer, "mul"))

    def squeeze_excite(self, x: str, layer: str, reduction: int = 4) -> str:
        """Keras EfficientNet/MobileNetV3 squeeze-and-excitation: GlobalAveragePooling2D
        (ReduceMean, keepdims 0) -> Reshape((1, 1, C)) -> 1x1 Conv -> ReLU -> 1x1 Conv ->
        hard sigmoid -> Multiply. Once transposed away, the Reshape target is (-1, C, 1, 1)."""
        c = self.channels(x)
        axes = [1, 2] if self.per_op else [2, 3]
        y = self.node("ReduceMean", [x], self.path(layer, "squeeze/Mean"), shape=(1, c), axes=axes, keepdims=0)
        target = (-1, 1, 1, c) if self.per_op else (-1, c, 1, 1)
        t = self.init(f"{self.path(layer, 'reshape/Reshape/shape')}:0", np.array(target, np.int64))
        y = self.node("Reshape", [y, t], self.path(layer, "reshape/Reshape"), shape=(1, *target[1:]))
        y = self.relu(self.conv(y, f"{layer}_reduce", max(c // reduction, 1), 1, bias=True), f"{layer}_reduce")
        y = self.hard_sigmoid(self.conv(y, f"{layer}_expand", c, 1, bias=True), f"{layer}_hard_sigmoid")
        return self.node("Mul", [x, y], self.path(layer, "excite/mul"))

    def dense(self, x: str, layer: str, fan_in: int, fan_out: int) -> str:
        """Keras Dense on a (1, fan_in) vector: MatMul + Add (BiasAdd)."""
        w = self.dense_weight(f"{self.path(layer, 'MatMul/ReadVariableOp')}:0", fan_in, fan_out)
        y = self.node("MatMul", [x, w], self.path(layer, "MatMul"), shape=(1, fan_out))
        b = self.vector(f"{self.path(layer, 'BiasAdd/ReadVariableOp')}:0", fan_out, "bias")
        return self.node("Add", [y, b], self.path(layer, "BiasAdd"))

    def upsample(self, x: str, layer: str, factor: int = 2) -> str:
        """Keras UpSampling2D (nearest): Resize in NCHW with sizes = Concat(Shape(x)[0:2], HW*factor)."""
        name = self.path(layer, "resize/ResizeNearestNeighbor")
        xin = self.to_nchw(x, name) if self.per_op else x
        n, c = self.shapes[xin][0], self.shapes[xin][1]
        h, w = self.spatial(x)
        shape = self.node("Shape", [xin], f"{name}__shape", shape=(4,))
        start = self.init(f"{name}__start:0", np.array([0], np.int64))
        stop = self.init(f"{name}__stop:0", np.array([2], np.int64))
        nc = self.node("Slice", [shape, start, stop], f"{name}__slice", shape=(2,))
        hw = self.init(f"{self.path(layer, 'mul')}:0", np.array([h * factor, w * factor], np.int64))
        sizes = self.node("Concat", [nc, hw], f"{name}__concat", shape=(4,), axis=0)
        y = self.node(
            "Resize", [xin, "", "", sizes], name, shape=(n, c, h * factor, w * factor),
            mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor",
        )
        return self.to_nhwc(y, name) if self.per_op else y


def _nhwc_input(name: str, size: int | None, channels: int = 3) -> onnx.ValueInfoProto:
    dims = ["unk__100", size, size, channels] if size is not None else ["unk__100", "unk__101", "unk__102", channels]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def tf_mobilenet_v1(
    seed: int = 0, size: int = 64, classes: int = 10, opset: int = 13, width: int = 8, top: str = "conv",
) -> onnx.ModelProto:
    """Keras ``MobileNet`` (v1) through tf2onnx without its transpose optimiser.

    Static 64x64 NHWC input, so SAME padding is explicit and asymmetric (3x3 stride 2 on an
    even size pads (0, 1)); stride-2 depthwise convs read a ``ZeroPadding2D`` Pad node and
    have ``padding='valid'``; Relu6 is Clip; BatchNorm constants shaped (C,). ``top="conv"``
    (Keras' own): ReduceMean(axes [1, 2], keepdims 1), a 1x1 Conv to the classes,
    ``Reshape([-1, classes])`` and Softmax; ``top="dense"`` (GlobalAveragePooling2D + Dense):
    ReduceMean(axes [1, 2], keepdims 0), MatMul + Add, Softmax. Total stride 32.
    """
    if top not in ("conv", "dense"):
        raise ValueError(f"top must be 'conv' or 'dense', got {top!r}")
    g = _TF(seed, opset, "per_op", "explicit", "mobilenet_1.00_64")
    x = "input_1"
    g.shapes[x] = (1, size, size, 3)
    y = g.conv(x, "conv1", width, 3, 2)
    y = g.relu6(g.batch_norm(y, "conv1_bn"), "conv1_relu")
    plan = [(2 * width, 1), (4 * width, 2), (4 * width, 1), (8 * width, 2), (8 * width, 1), (16 * width, 2), (16 * width, 2)]
    for i, (cout, stride) in enumerate(plan, start=1):
        if stride == 2:
            y = g.zero_pad(y, f"conv_pad_{i}", 0, 1, 0, 1)
            y = g.conv(y, f"conv_dw_{i}", 0, 3, 2, padding="valid", depthwise=True)
        else:
            y = g.conv(y, f"conv_dw_{i}", 0, 3, 1, depthwise=True)
        y = g.relu6(g.batch_norm(y, f"conv_dw_{i}_bn"), f"conv_dw_{i}_relu")
        y = g.conv(y, f"conv_pw_{i}", cout, 1, 1)
        y = g.relu6(g.batch_norm(y, f"conv_pw_{i}_bn"), f"conv_pw_{i}_relu")
    c = g.channels(y)
    mean = g.path("global_average_pooling2d", "Mean")
    if top == "conv":
        y = g.node("ReduceMean", [y], mean, shape=(1, 1, 1, c), axes=[1, 2], keepdims=1)
        y = g.node("Identity", [y], g.path("dropout", "Identity"))
        y = g.conv(y, "conv_preds", classes, 1, 1, bias=True)
        target = g.init(f"{g.path('reshape_2', 'Reshape/shape')}:0", np.array([-1, classes], np.int64))
        y = g.node("Reshape", [y, target], g.path("reshape_2", "Reshape"), shape=(1, classes))
    else:
        y = g.node("ReduceMean", [y], mean, shape=(1, c), axes=[1, 2], keepdims=0)
        y = g.dense(y, "predictions", c, classes)
    g.node("Softmax", [y], g.path("predictions", "Softmax"), output="predictions", axis=-1)
    return g.model(
        [_nhwc_input("input_1", size)],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["unk__103", classes])],
        "tf_mobilenet_v1", ("tf2onnx", "1.16.1 15c810"),
    )


def tf_mobilenet_v2(seed: int = 0, classes: int = 10, opset: int = 15, width: int = 8, se: bool = False) -> onnx.ModelProto:
    """Keras ``MobileNetV2(input_shape=(None, None, 3))`` through tf2onnx with its optimiser.

    Dynamic spatial dims, so every SAME conv is ``auto_pad=SAME_UPPER``; one Transpose pair
    around the whole backbone, BatchNorm constants shaped (C, 1, 1); ``correct_pad``
    ZeroPadding2D ((0, 1), (0, 1)) before each stride-2 depthwise conv; inverted residuals
    with Add; GlobalAveragePool + Squeeze, MatMul + Add + Softmax. Analysis size: pass
    ``input_shapes={"input_1": (1, 64, 64, 3)}``. Total stride 32.

    ``se=True`` adds Keras MobileNetV3/EfficientNet-style squeeze-and-excitation (ReduceMean
    keepdims 0, Reshape to (-1, C, 1, 1), two 1x1 Convs, hard sigmoid, Mul) to the three
    blocks at output strides 2 and 4: a dense rewrite then reaches output stride 4 and up.
    """
    g = _TF(seed, opset, "once", "auto", "mobilenetv2_1.00_None")
    x = "input_1"
    g.shapes[x] = (1, 64, 64, 3)  # the analysis size, for this builder's own bookkeeping only
    y = g.enter(x)
    y = g.conv(y, "Conv1", width, 3, 2)
    y = g.relu6(g.batch_norm(y, "bn_Conv1"), "Conv1_relu")
    blocks = [(1, 2 * width, 1), (6, 3 * width, 2), (6, 3 * width, 1), (6, 4 * width, 2), (6, 4 * width, 1),
              (6, 8 * width, 2), (6, 12 * width, 1), (6, 20 * width, 2)]
    for i, (t, cout, stride) in enumerate(blocks):
        pre = f"block_{i}" if i else "expanded_conv"
        x_in = y
        cin = g.channels(y)
        if t != 1:
            y = g.conv(y, f"{pre}_expand", cin * t, 1, 1)
            y = g.relu6(g.batch_norm(y, f"{pre}_expand_BN"), f"{pre}_expand_relu")
        if stride == 2:
            y = g.zero_pad(y, f"{pre}_pad", 0, 1, 0, 1)
            y = g.conv(y, f"{pre}_depthwise", 0, 3, 2, padding="valid", depthwise=True)
        else:
            y = g.conv(y, f"{pre}_depthwise", 0, 3, 1, depthwise=True)
        y = g.relu6(g.batch_norm(y, f"{pre}_depthwise_BN"), f"{pre}_depthwise_relu")
        if se and i < 3:
            y = g.squeeze_excite(y, f"{pre}_squeeze_excite")
        y = g.batch_norm(g.conv(y, f"{pre}_project", cout, 1, 1), f"{pre}_project_BN")
        if stride == 1 and cin == cout:
            y = g.add(x_in, y, f"{pre}_add")
    y = g.conv(y, "Conv_1", 32 * width, 1, 1)
    y = g.relu6(g.batch_norm(y, "Conv_1_bn"), "out_relu")
    c = g.channels(y)
    y = g.node("GlobalAveragePool", [y], g.path("global_average_pooling2d", "Mean"), shape=(1, c, 1, 1))
    axes = g.init(f"{g.path('global_average_pooling2d', 'Squeeze/axes')}:0", np.array([2, 3], np.int64))
    y = g.node("Squeeze", [y, axes], g.path("global_average_pooling2d", "Squeeze"), shape=(1, c))
    y = g.dense(y, "predictions", c, classes)
    g.node("Softmax", [y], g.path("predictions", "Softmax"), output="predictions", axis=-1)
    return g.model(
        [_nhwc_input("input_1", None)],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["unk__103", classes])],
        "tf_mobilenet_v2", ("tf2onnx", "1.16.1 15c810"),
    )


def tf_segmenter(
    seed: int = 0, classes: int = 5, opset: int = 17, width: int = 8, image_pooling: bool = False,
    stem: str = "same",
) -> onnx.ModelProto:
    """A Keras DeepLab-like segmenter through tf2onnx (no optimiser), fully convolutional.

    Dynamic NHWC input (pass ``input_shapes={"input_1": (1, 48, 48, 3)}``), a Rescaling
    Mul/Sub, a SAME_UPPER stride-2 stem, a SAME MaxPool, a residual block, a downsampling
    block (ZeroPadding2D + valid stride-2 conv; 1x1 stride-2 projection shortcut), atrous
    convs (dilations 2 and 4, explicit pads) in an ASPP with a channel Concat (axis 3), and
    per-pixel logits with a Softmax over the last (channel) axis. Output stride 8.

    ``image_pooling=True`` adds DeepLab's image-level ASPP branch as keras-deeplab-v3-plus
    writes it: GlobalAveragePooling2D (ReduceMean, keepdims 0) -> Reshape((1, 1, C)) -> 1x1
    Conv -> Relu -> bilinear Resize to the feature map's size (read with Shape) -> Concat:
    global context.
    """
    g = _TF(seed, opset, "per_op", "auto", "deeplab", bn_rank4=True)
    x = "input_1"
    g.shapes[x] = (1, 48, 48, 3)
    scale = g.init(f"{g.path('rescaling', 'Cast/x')}:0", np.array(1 / 127.5, np.float32))
    one = g.init(f"{g.path('rescaling', 'Cast_1/x')}:0", np.array(1.0, np.float32))
    y = g.node("Mul", [x, scale], g.path("rescaling", "mul"))
    y = g.node("Sub", [y, one], g.path("rescaling", "sub"))
    if stem == "same":
        y = g.relu(g.batch_norm(g.conv(y, "stem_conv", width, 3, 2), "stem_bn"), "stem_relu")
        y = g.max_pool(y, "stem_pool", 3, 2)
    else:  # Keras ResNet50's stem: ZeroPadding2D(3) on the input, 7x7/2 valid, ZeroPadding2D(1), 3x3/2 valid pool
        y = g.zero_pad(y, "conv1_pad", 3, 3, 3, 3)
        y = g.relu(g.batch_norm(g.conv(y, "conv1_conv", width, 7, 2, padding="valid"), "conv1_bn"), "conv1_relu")
        y = g.zero_pad(y, "pool1_pad", 1, 1, 1, 1)
        y = g.max_pool(y, "pool1_pool", 3, 2, padding="valid")
    r = g.relu(g.batch_norm(g.conv(y, "res1_conv1", width, 3), "res1_bn1"), "res1_relu1")
    r = g.batch_norm(g.conv(r, "res1_conv2", width, 3), "res1_bn2")
    y = g.relu(g.add(y, r, "res1_add"), "res1_out")
    r = g.zero_pad(y, "res2_pad", 1, 1, 1, 1)
    r = g.relu(g.batch_norm(g.conv(r, "res2_conv1", 2 * width, 3, 2, padding="valid"), "res2_bn1"), "res2_relu1")
    r = g.batch_norm(g.conv(r, "res2_conv2", 2 * width, 3), "res2_bn2")
    short = g.batch_norm(g.conv(y, "res2_shortcut", 2 * width, 1, 2), "res2_shortcut_bn")
    y = g.relu(g.add(short, r, "res2_add"), "res2_out")
    y = g.relu(g.batch_norm(g.conv(y, "atrous_conv", 2 * width, 3, d=2), "atrous_bn"), "atrous_relu")
    branches = [
        g.relu(g.batch_norm(g.conv(y, "aspp0", width, 1), "aspp0_bn"), "aspp0_relu"),
        g.relu(g.batch_norm(g.conv(y, "aspp1", width, 3, d=2), "aspp1_bn"), "aspp1_relu"),
        g.relu(g.batch_norm(g.conv(y, "aspp2", width, 3, d=4), "aspp2_bn"), "aspp2_relu"),
    ]
    if image_pooling:
        c = g.channels(y)
        p = g.node("ReduceMean", [y], g.path("image_pooling", "Mean"), shape=(1, c), axes=[1, 2], keepdims=0)
        target = g.init(f"{g.path('image_pooling_reshape', 'Reshape/shape')}:0", np.array([-1, 1, 1, c], np.int64))
        p = g.node("Reshape", [p, target], g.path("image_pooling_reshape", "Reshape"), shape=(1, 1, 1, c))
        p = g.relu(g.conv(p, "image_pooling_conv", width, 1, bias=True), "image_pooling_relu")
        h, w = g.spatial(y)
        name = g.path("image_pooling", "resize/ResizeBilinear")
        pin = g.to_nchw(p, name)
        shape = g.node("Shape", [g.to_nchw(y, f"{name}__ref")], f"{name}__shape", shape=(4,))
        start = g.init(f"{name}__start:0", np.array([2], np.int64))
        stop = g.init(f"{name}__stop:0", np.array([4], np.int64))
        hw = g.node("Slice", [shape, start, stop], f"{name}__slice", shape=(2,))
        nc = g.init(f"{name}__nc:0", np.array([1, width], np.int64))
        sizes = g.node("Concat", [nc, hw], f"{name}__concat", shape=(4,), axis=0)
        up = g.node(
            "Resize", [pin, "", "", sizes], name, shape=(1, width, h, w), mode="linear",
            coordinate_transformation_mode="half_pixel",
        )
        branches.append(g.to_nhwc(up, name))
    y = g.concat(branches, "aspp_concat")
    y = g.relu(g.batch_norm(g.conv(y, "aspp_project", 2 * width, 1), "aspp_project_bn"), "aspp_project_relu")
    y = g.conv(y, "logits", classes, 1, bias=True)
    g.node("Softmax", [y], g.path("softmax", "Softmax"), output="softmax", axis=-1)
    return g.model(
        [_nhwc_input("input_1", None)],
        [helper.make_tensor_value_info("softmax", TensorProto.FLOAT, ["unk__100", "unk__104", "unk__105", classes])],
        "tf_segmenter" + ("_image_pooling" if image_pooling else ""), ("tf2onnx", "1.16.1 15c810"),
    )


#: The backbone features of :func:`tf_yolo_tiny` (strides 16 and 32), for ``--outputs``.
YOLO_BACKBONE = (
    "StatefulPartitionedCall/yolov3_tiny/leaky_4/LeakyRelu:0",
    "StatefulPartitionedCall/yolov3_tiny/leaky_7/LeakyRelu:0",
)


def tf_yolo_tiny(seed: int = 0, size: int = 96, classes: int = 3, opset: int = 13, width: int = 4) -> onnx.ModelProto:
    """A Keras YOLOv3-tiny through tf2onnx (no optimiser): backbone, neck, two heads.

    Static NHWC input; Conv (no bias) + Mul/Add BatchNorm + LeakyReLU(0.1); five SAME
    MaxPools of stride 2 and YOLOv3-tiny's 2x2 stride-1 SAME MaxPool (pads (0, 1)). The neck
    takes the stride-32 feature through a 1x1 Conv, UpSampling2D (Resize, nearest) and a
    Concat (axis 3) with the stride-16 feature. Outputs ``yolo_16`` and ``yolo_32`` (NHWC,
    3 anchors x (5 + classes)). :data:`YOLO_BACKBONE` names the two backbone features.
    """
    g = _TF(seed, opset, "per_op", "explicit", "yolov3_tiny", bn_rank4=True)
    x = "input_1"
    g.shapes[x] = (1, size, size, 3)

    def cbl(y, i, cout, k=3):
        y = g.batch_norm(g.conv(y, f"conv_{i}", cout, k), f"bn_{i}")
        return g.leaky(y, f"leaky_{i}")

    y = x
    for i, c in enumerate([1, 2, 4, 8]):
        y = g.max_pool(cbl(y, i, c * width), f"pool_{i}", 2, 2)
    c4 = cbl(y, 4, 16 * width)  # stride 16, the route to the second head
    y = g.max_pool(c4, "pool_4", 2, 2)
    y = cbl(y, 5, 32 * width)
    y = g.max_pool(y, "pool_5", 2, 1)
    y = cbl(y, 6, 64 * width)
    c5 = cbl(y, 7, 16 * width, 1)  # stride 32
    assert (c4, c5) == YOLO_BACKBONE, (c4, c5)
    head = 3 * (5 + classes)
    y = cbl(c5, 8, 32 * width)
    out32 = g.conv(y, "conv_9", head, 1, bias=True)
    y = cbl(c5, 10, 8 * width, 1)
    y = g.upsample(y, "up_sampling2d")
    y = g.concat([y, c4], "concatenate")
    y = cbl(y, 11, 16 * width)
    out16 = g.conv(y, "conv_12", head, 1, bias=True)
    g.node("Identity", [out32], "Identity", output="yolo_32")
    g.node("Identity", [out16], "Identity_1", output="yolo_16")
    s32, s16 = -(-size // 32), -(-size // 16)
    return g.model(
        [_nhwc_input("input_1", size)],
        [
            helper.make_tensor_value_info("yolo_32", TensorProto.FLOAT, ["unk__100", s32, s32, head]),
            helper.make_tensor_value_info("yolo_16", TensorProto.FLOAT, ["unk__100", s16, s16, head]),
        ],
        "tf_yolo_tiny", ("tf2onnx", "1.16.1 15c810"),
    )


# ================================================================================ paddle2onnx


class _Paddle(_Graph):
    """paddle2onnx's output: NCHW, Conv + BatchNormalization, Constant nodes for shapes."""

    def __init__(self, seed: int, opset: int) -> None:
        super().__init__(seed, opset)

    def tmp(self, kind: str) -> str:
        return f"{kind}_{self.count(kind)}.tmp_0"

    def p2o(self, op: str) -> str:
        return f"p2o.{op}.{self.count('p2o.' + op)}"

    def conv(self, x: str, name: str, cout: int, k: int, s: int = 1, groups: int = 1, bias: bool = False) -> str:
        n, cin, h, w = self.shapes[x]
        p = (k - 1) // 2
        weight = self.conv_weight(f"{name}_weights", (cout, cin // groups, k, k))
        inputs = [x, weight]
        if bias:
            inputs.append(self.vector(f"{name}_offset", cout, "bias"))
        oh, ow = _conv_out(h, k, s, 1, p, p), _conv_out(w, k, s, 1, p, p)
        return self.node(
            "Conv", inputs, self.p2o("Conv"), output=self.tmp("conv2d"), shape=(n, cout, oh, ow),
            kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p], dilations=[1, 1], group=groups,
        )

    def bn(self, x: str, name: str) -> str:
        c = self.shapes[x][1]
        params = [
            self.vector(f"{name}_bn_scale", c, "scale"),
            self.vector(f"{name}_bn_offset", c, "offset"),
            self.vector(f"{name}_bn_mean", c, "mean"),
            self.vector(f"{name}_bn_variance", c, "var"),
        ]
        return self.node(
            "BatchNormalization", [x, *params], self.p2o("BatchNormalization"), output=self.tmp("batch_norm"),
            epsilon=1e-5, momentum=0.9,
        )

    def act(self, x: str, kind: str | None) -> str:
        if kind is None:
            return x
        if kind == "relu":
            return self.node("Relu", [x], self.p2o("Relu"), output=self.tmp("relu"))
        if kind == "hardswish":
            if self.opset >= 14:
                return self.node("HardSwish", [x], self.p2o("HardSwish"), output=self.tmp("hardswish"))
            three = self.constant_node(self.p2o("Constant"), np.array(3.0, np.float32))
            zero = self.constant_node(self.p2o("Constant"), np.array(0.0, np.float32))
            six = self.constant_node(self.p2o("Constant"), np.array(6.0, np.float32))
            y = self.node("Add", [x, three], self.p2o("Add"), output=self.tmp("tmp"))
            y = self.node("Clip", [y, zero, six], self.p2o("Clip"), output=self.tmp("tmp"))
            y = self.node("Mul", [x, y], self.p2o("Mul"), output=self.tmp("tmp"))
            return self.node("Div", [y, six], self.p2o("Div"), output=self.tmp("hardswish"))
        if kind == "relu6":
            zero = self.constant_node(self.p2o("Constant"), np.array(0.0, np.float32))
            six = self.constant_node(self.p2o("Constant"), np.array(6.0, np.float32))
            return self.node("Clip", [x, zero, six], self.p2o("Clip"), output=self.tmp("relu6"))
        raise ValueError(kind)

    def conv_bn(self, x: str, name: str, cout: int, k: int, s: int = 1, groups: int = 1, act: str | None = None) -> str:
        return self.act(self.bn(self.conv(x, name, cout, k, s, groups), name), act)

    def se(self, x: str, name: str, reduction: int = 4) -> str:
        """PaddleClas SEModule: AdaptiveAvgPool2D(1) -> Conv -> ReLU -> Conv -> Hardsigmoid -> Mul."""
        n, c = self.shapes[x][:2]
        y = self.node("GlobalAveragePool", [x], self.p2o("GlobalAveragePool"), output=self.tmp("pool2d"), shape=(n, c, 1, 1))
        y = self.act(self.conv(y, f"{name}_1", c // reduction, 1, bias=True), "relu")
        y = self.conv(y, f"{name}_2", c, 1, bias=True)
        y = self.node("HardSigmoid", [y], self.p2o("HardSigmoid"), output=self.tmp("hardsigmoid"), alpha=0.2, beta=0.5)
        return self.node("Mul", [x, y], self.p2o("Mul"), output=self.tmp("elementwise_mul"), shape=self.shapes[x])


def paddle_mobilenet_v3(
    seed: int = 0, size: int = 64, classes: int = 10, opset: int = 11, width: int = 8, dynamic: bool = False,
) -> onnx.ModelProto:
    """A PaddleClas MobileNetV3-like classifier through paddle2onnx.

    Stem (stride 2), then inverted-residual blocks; squeeze-and-excitation in the blocks at
    output strides 4 and 8 only, so a dense rewrite reaches output stride 8 with every SE at
    eST 1 and refuses below it. HardSwish (an op from opset 14, decomposed below), ReLU6 as
    Clip with Constant min/max, a head of 1x1 Conv -> GlobalAveragePool -> 1x1 Conv ->
    HardSwish -> dropout (Identity) -> Reshape([0, -1] from a Constant) -> MatMul + Add ->
    Softmax. Total stride 32.

    ``dynamic``: as paddle2onnx writes a model exported with ``InputSpec([None, 3, None, None])``:
    the input declared ``[-1, 3, "?", "?"]`` (a negative dim_value and "?" dim_params), and the
    head's Reshape target built at run time, ``Cast(Concat(Cast(Gather(Shape(y), [0]), int32),
    [-1]), int64)``.
    """
    g = _Paddle(seed, opset)
    x = "x"
    g.shapes[x] = (1, 3, size, size)
    y = g.conv_bn(x, "conv1", 2 * width, 3, 2, act="hardswish")
    # (kernel, expanded, out, SE, activation, stride)
    blocks = [
        (3, 2 * width, 2 * width, True, "relu", 2),     # stride 4, SE
        (3, 6 * width, 3 * width, False, "relu6", 2),   # stride 8
        (3, 9 * width, 3 * width, True, "relu", 1),     # stride 8, SE, residual
        (5, 9 * width, 5 * width, False, "hardswish", 2),  # stride 16
        (5, 15 * width, 5 * width, False, "hardswish", 1),  # residual
        (3, 15 * width, 6 * width, False, "hardswish", 2),  # stride 32
    ]
    for i, (k, mid, cout, se, act, s) in enumerate(blocks, start=2):
        cin = g.shapes[y][1]
        x_in = y
        if mid != cin:
            y = g.conv_bn(y, f"conv{i}_expand", mid, 1, act=act)
        y = g.conv_bn(y, f"conv{i}_depthwise", mid, k, s, groups=mid, act=act)
        if se:
            y = g.se(y, f"conv{i}_se")
        y = g.conv_bn(y, f"conv{i}_linear", cout, 1)
        if s == 1 and cin == cout:
            y = g.node("Add", [x_in, y], g.p2o("Add"), output=g.tmp("elementwise_add"))
    y = g.conv_bn(y, "conv_last", 12 * width, 1, act="hardswish")
    n, c = g.shapes[y][:2]
    y = g.node("GlobalAveragePool", [y], g.p2o("GlobalAveragePool"), output=g.tmp("pool2d"), shape=(n, c, 1, 1))
    y = g.act(g.conv(y, "last_1x1_conv", 16 * width, 1, bias=False), "hardswish")
    y = g.node("Identity", [y], g.p2o("Identity"), output=g.tmp("dropout"))
    if dynamic:
        shape = g.node("Shape", [y], g.p2o("Shape"), output=g.tmp("shape"), shape=(4,))
        first = g.constant_node(g.p2o("Constant"), np.array([0], np.int64))
        batch = g.node("Gather", [shape, first], g.p2o("Gather"), output=g.tmp("slice"), shape=(1,), axis=0)
        batch = g.node("Cast", [batch], g.p2o("Cast"), output=g.tmp("cast"), to=TensorProto.INT32)
        rest = g.constant_node(g.p2o("Constant"), np.array([-1], np.int32))
        target = g.node("Concat", [batch, rest], g.p2o("Concat"), output=g.tmp("concat"), shape=(2,), axis=0)
        target = g.node("Cast", [target], g.p2o("Cast"), output=g.tmp("cast"), to=TensorProto.INT64)
    else:
        target = g.constant_node(g.p2o("Constant"), np.array([0, -1], np.int64))
    y = g.node("Reshape", [y, target], g.p2o("Reshape"), output=g.tmp("flatten"), shape=(n, 16 * width))
    w = g.dense_weight("fc_0.w_0", 16 * width, classes)
    y = g.node("MatMul", [y, w], g.p2o("MatMul"), output=g.tmp("linear"), shape=(n, classes))
    b = g.vector("fc_0.b_0", classes, "bias")
    y = g.node("Add", [y, b], g.p2o("Add"), output=g.tmp("linear"))
    g.node("Softmax", [y], g.p2o("Softmax"), output="softmax_0.tmp_0", axis=-1 if opset >= 13 else 1)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["p2o.DynamicDimension.0", 3, size, size])
    if dynamic:
        dims = x_info.type.tensor_type.shape.dim
        dims[0].Clear()
        dims[0].dim_value = -1
        for d in dims[2:]:
            d.Clear()
            d.dim_param = "?"
    return g.model(
        [x_info],
        [helper.make_tensor_value_info("softmax_0.tmp_0", TensorProto.FLOAT, ["p2o.DynamicDimension.1", classes])],
        "paddle_mobilenet_v3", ("PaddlePaddle", "2.6.1"), ir_version=7 if opset <= 13 else 8,
    )


MODELS: dict[str, Callable[..., onnx.ModelProto]] = {
    "tf_mobilenet_v1": tf_mobilenet_v1,
    "tf_mobilenet_v2": tf_mobilenet_v2,
    "tf_segmenter": tf_segmenter,
    "tf_yolo_tiny": tf_yolo_tiny,
    "paddle_mobilenet_v3": paddle_mobilenet_v3,
}


def build(name: str, **kwargs) -> onnx.ModelProto:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
