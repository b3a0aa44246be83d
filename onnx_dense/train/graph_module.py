"""A ``torch.nn.Module`` that runs an ONNX graph node by node, so a dense model can be trained.

Why this exists: the converters fail on exactly the graphs ``onnx-dense rewrite`` produces.
onnx2torch 1.5.15 stops at AveragePool-19 ("Converter is not implemented") and onnx2pytorch
0.6.0 at a dilated MaxPool whose pad exceeds kernel/2 (../shared/FIELD-NOTES.md); PyTorch's own
pooling refuses such pads too (pad <= kernel/2) and has no dilated average pool at all. This
module interprets the graph instead, with the ONNX semantics made explicit:

* every window's pads are applied with ``F.pad`` first (``-inf`` for MaxPool, zeros otherwise),
  so pads of any size work; ``auto_pad=SAME_*`` pads are computed from the run-time size with
  the dilation included;
* AveragePool is a depthwise convolution with a ones kernel (dilations work), divided by the
  window size or, where padding is not counted (``count_include_pad=0``) or a ``ceil_mode``
  window runs past the pads, by the per-position count of counted pixels;
* ``ceil_mode`` windows follow ONNX (a last window that starts in the end padding is dropped);
* Dropout keeps its inference semantics (identity): the exporters trace in eval mode anyway.

Nodes run in topological order. Tensors:

* float initializers with at least one dimension become ``nn.Parameter`` (trainable),
  except BatchNormalization's running mean/variance (buffers, updated only when BatchNorm is
  trained: ``train_bn``) and inputs that configure an op rather than feed it (Clip bounds,
  Pad values, Resize scales); those and 0-d float initializers (an exporter's scalar constants
  such as LRN's alpha) are buffers. ``trainable=`` overrides the choice by name.
* Constant-node floats are non-persistent buffers (they follow ``.to(device)``); integer
  initializers and constants stay plain CPU tensors, like every shape computation.

ONNX names may contain dots, which ``nn.Module`` refuses, so each tensor is registered under an
escaped attribute name; :meth:`OnnxGraphModule.state_dict_onnx` and
:meth:`OnnxGraphModule.load_state_dict_onnx` speak ONNX names.

Supported ops (opsets 11-23, both attribute and input forms where an opset moved one):
see :data:`SUPPORTED_OPS`. Anything else is refused when the module is built, with the node named.

Why one long module (about 1,500 lines, over the project's ~600): it is one op table, some 90
kernels of 5-30 lines registered with ``_op``, that share the window helpers (pads, SAME,
ceil_mode) and the build context; each kernel is read against its ONNX operator page, not
against the others, and a split by op family would only move the registry and the helpers
apart. The sections below are its table of contents.
"""

from __future__ import annotations

import collections
import heapq
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from onnx_dense.errors import DenseError

__all__ = ["OnnxGraphModule", "SUPPORTED_OPS", "load_onnx"]

_ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
}
if hasattr(torch, "uint16"):
    _ONNX_TO_TORCH.update(
        {onnx.TensorProto.UINT16: torch.uint16, onnx.TensorProto.UINT32: torch.uint32, onnx.TensorProto.UINT64: torch.uint64}
    )

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}

#: (op, input index) pairs that configure an op rather than carry data: never trained.
_CONFIG_INPUTS = {
    ("Clip", 1), ("Clip", 2), ("Pad", 1), ("Pad", 2), ("Resize", 1), ("Resize", 2), ("Resize", 3),
    ("ConstantOfShape", 0), ("Dropout", 1), ("Dropout", 2), ("Range", 0), ("Range", 1), ("Range", 2),
}
#: BatchNormalization inputs that are statistics, not weights.
_BN_STATS = {("BatchNormalization", 3), ("BatchNormalization", 4)}

#: Ops whose extra inputs are shapes, axes or sizes read as Python ints: their inputs are not
#: moved to the device of the data (that would cost a device round trip per call).
_HOST_ARG_OPS = {
    "Reshape", "Slice", "Pad", "Squeeze", "Unsqueeze", "Expand", "Tile", "ConstantOfShape", "Range", "Split",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare",
    "ReduceLogSumExp", "TopK", "Resize", "If",
}


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def load_onnx(model) -> tuple[onnx.ModelProto, dict[str, np.ndarray], str | None]:
    """(proto, initializer arrays that must not be read from the proto, source path) for a
    path, an ``onnx.ModelProto`` or an onnx-ir ``Model``."""
    if isinstance(model, onnx.ModelProto):
        return model, {}, None
    if isinstance(model, (str, os.PathLike)):
        from onnx_dense import model_io

        model_io.load(model)  # one clear line for every way a file can be bad
        try:
            proto = onnx.load(str(model))
        except Exception as exc:  # pragma: no cover - model_io.load accepted it
            raise DenseError(f"{model}: could not be read ({str(exc).splitlines()[0][:200]})") from None
        return proto, {}, str(model)
    if hasattr(model, "graph") and hasattr(model, "opset_imports"):  # onnx-ir Model
        import onnx_ir as ir

        arrays = {}
        for name, value in model.graph.initializers.items():
            if isinstance(value.const_value, ir.ExternalTensor):
                arrays[name] = value.const_value.numpy()
        return ir.serde.serialize_model(model), arrays, model.meta.get("onnx_dense.path")
    raise DenseError(f"expected an ONNX model (path, onnx.ModelProto or onnx_ir.Model), got {type(model).__name__}")


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).copy()).view(torch.bfloat16)
    array = np.array(array, copy=True)  # writable, owned
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return torch.from_numpy(array)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        out[a.name] = value
    return out


def _dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def _label(node: onnx.NodeProto) -> str:
    return f"'{node.name or (node.output[0] if node.output else '<unnamed>')}' ({node.op_type})"


def _escape(name: str, taken: set[str]) -> str:
    base = "t_" + re.sub(r"\W", "_", name)
    attr, k = base, 1
    while attr in taken:
        k += 1
        attr = f"{base}_{k}"
    taken.add(attr)
    return attr


# --------------------------------------------------------------------------------------------
# helpers shared by the ops
# --------------------------------------------------------------------------------------------


def _ints(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _scalar(value) -> float | int | bool:
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[0].item()
    return value


def _torch_pads(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) over the trailing axes -> F.pad's last-axis-first list."""
    out: list[int] = []
    for b, e in zip(reversed(list(begin)), reversed(list(end))):
        out += [int(b), int(e)]
    return out


def _same_pads(sizes, kernel, strides, dilations, mode: str) -> tuple[list[int], list[int]]:
    begin, end = [], []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        big = total - small
        if mode == "SAME_UPPER":
            begin.append(small)
            end.append(big)
        else:
            begin.append(big)
            end.append(small)
    return begin, end


class _Window:
    """kernel/strides/dilations/pads of a Conv or pool node, resolved at run time."""

    def __init__(self, attrs: dict, node: onnx.NodeProto):
        self.kernel = list(attrs.get("kernel_shape", []))
        self.strides = list(attrs.get("strides", []))
        self.dilations = list(attrs.get("dilations", []))
        self.pads = list(attrs.get("pads", []))
        self.auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
        self.ceil = bool(attrs.get("ceil_mode", 0))
        if self.auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise DenseError(f"node {_label(node)}: unknown auto_pad '{self.auto_pad}'")

    def resolve(self, sizes: Sequence[int], kernel: Sequence[int] | None = None):
        nd = len(sizes)
        k = list(kernel) if kernel is not None else self.kernel
        s = self.strides or [1] * nd
        d = self.dilations or [1] * nd
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = _same_pads(sizes, k, s, d, self.auto_pad)
        elif self.auto_pad == "VALID" or not self.pads:
            begin, end = [0] * nd, [0] * nd
        else:
            begin, end = self.pads[:nd], self.pads[nd:]
        return k, s, d, begin, end


def _ceil_extra(sizes, k, s, d, begin, end) -> list[int]:
    """End padding that turns an ONNX ceil_mode window count into a floor one."""
    extra = []
    for n, kk, ss, dd, b, e in zip(sizes, k, s, d, begin, end):
        length = n + b + e
        span = (kk - 1) * dd + 1
        out = math.ceil((length - span) / ss) + 1
        if (out - 1) * ss >= n + b:  # the last window would start in the end padding
            out -= 1
        extra.append(max((out - 1) * ss + span - length, 0))
    return extra


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _nd(node, x, table) -> int:
    nd = x.dim() - 2
    if nd not in table:
        raise DenseError(f"node {_label(node)}: {nd} spatial axes are not supported (1 to 3 are)")
    return nd


def _lowest(dtype: torch.dtype) -> float:
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


# --------------------------------------------------------------------------------------------
# ops: each builder takes (node, attrs, ctx) and returns fn(*inputs) -> Tensor | tuple
# --------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable] = {}


def _op(*names):
    def register(builder):
        for name in names:
            _BUILDERS[name] = builder
        return builder

    return register


class _Context:
    """What a builder may need besides its node: the opset, the owning module, subgraphs."""

    def __init__(self, module: "OnnxGraphModule", opset: int, outer: set[str]):
        self.module = module
        self.opset = opset
        self.outer = outer


@_op("Conv")
def _b_conv(node, a, ctx):
    window = _Window(a, node)
    group = int(a.get("group", 1))

    def conv(x, w, b=None):
        nd = _nd(node, x, _CONV)
        k, s, d, begin, end = window.resolve(x.shape[2:], w.shape[2:])
        if begin == end:
            return _CONV[nd](x, w, b, s, begin, d, group)
        return _CONV[nd](F.pad(x, _torch_pads(begin, end)), w, b, s, 0, d, group)

    return conv


@_op("ConvTranspose")
def _b_conv_transpose(node, a, ctx):
    window = _Window(a, node)
    group = int(a.get("group", 1))
    output_padding = list(a.get("output_padding", []))
    if "output_shape" in a or window.auto_pad not in ("NOTSET", "VALID"):
        raise DenseError(f"node {_label(node)}: ConvTranspose with output_shape or auto_pad SAME is not supported")

    def conv_t(x, w, b=None):
        nd = _nd(node, x, _CONV_T)
        k, s, d, begin, end = window.resolve(x.shape[2:], w.shape[2:])
        out = _CONV_T[nd](x, w, b, s, 0, output_padding or [0] * nd, group, d)
        index = [slice(None), slice(None)] + [slice(bb, out.shape[2 + i] - ee) for i, (bb, ee) in enumerate(zip(begin, end))]
        return out[tuple(index)]

    return conv_t


@_op("MaxPool")
def _b_maxpool(node, a, ctx):
    window = _Window(a, node)
    if int(a.get("storage_order", 0)) != 0:
        raise DenseError(f"node {_label(node)}: MaxPool with storage_order=1 is not supported")
    want_indices = len(node.output) > 1 and bool(node.output[1])

    def maxpool(x):
        nd = _nd(node, x, _MAXPOOL)
        sizes = list(x.shape[2:])
        k, s, d, begin, end = window.resolve(sizes)
        if window.ceil:
            end = [e + x_ for e, x_ in zip(end, _ceil_extra(sizes, k, s, d, begin, end))]
        padded = F.pad(x, _torch_pads(begin, end), value=_lowest(x.dtype)) if any(begin + end) else x
        if not want_indices:
            return _MAXPOOL[nd](padded, k, s, 0, d)
        y, idx = _MAXPOOL[nd](padded, k, s, 0, d, return_indices=True)
        # torch: flat index within the padded plane; ONNX: flat index into the unpadded tensor
        padded_sizes = list(padded.shape[2:])
        flat = torch.zeros_like(idx)
        rem = idx
        coords = []
        for size in reversed(padded_sizes):
            coords.append(rem % size)
            rem = rem // size
        coords.reverse()
        for c, b, size in zip(coords, begin, sizes):
            flat = flat * size + (c - b)
        plane = math.prod(sizes)
        n, ch = x.shape[:2]
        base = torch.arange(n * ch, device=x.device).reshape(n, ch, *([1] * nd)) * plane
        return y, flat + base

    return maxpool


@_op("AveragePool")
def _b_avgpool(node, a, ctx):
    window = _Window(a, node)
    count_pad = bool(a.get("count_include_pad", 0))

    def avgpool(x):
        nd = _nd(node, x, _AVGPOOL)
        sizes = list(x.shape[2:])
        k, s, d, begin, end = window.resolve(sizes)
        extra = _ceil_extra(sizes, k, s, d, begin, end) if window.ceil else [0] * nd
        full_end = [e + x_ for e, x_ in zip(end, extra)]
        padded = F.pad(x, _torch_pads(begin, full_end)) if any(begin + full_end) else x
        padded_any = any(begin + end)
        if all(v == 1 for v in d) and not any(extra) and (count_pad or not padded_any):
            return _AVGPOOL[nd](padded, k, s, 0)
        channels = x.shape[1]
        ones = torch.ones((channels, 1, *k), dtype=x.dtype, device=x.device)
        summed = _CONV[nd](padded, ones, None, s, 0, d, channels)
        if (count_pad or not padded_any) and not any(extra):
            return summed / math.prod(k)
        # count of counted pixels per window: ones over the input (and the pads if counted)
        mask = torch.ones((1, 1, *sizes), dtype=x.dtype, device=x.device)
        if count_pad:
            mask = F.pad(mask, _torch_pads(begin, end), value=1.0)
            mask = F.pad(mask, _torch_pads([0] * nd, extra))
        else:
            mask = F.pad(mask, _torch_pads(begin, full_end))
        count = _CONV[nd](mask, torch.ones((1, 1, *k), dtype=x.dtype, device=x.device), None, s, 0, d)
        return summed / count

    return avgpool


@_op("LpPool")
def _b_lppool(node, a, ctx):
    window = _Window(a, node)
    p = float(a.get("p", 2))

    def lppool(x):
        nd = _nd(node, x, _CONV)
        sizes = list(x.shape[2:])
        k, s, d, begin, end = window.resolve(sizes)
        if window.ceil:
            end = [e + x_ for e, x_ in zip(end, _ceil_extra(sizes, k, s, d, begin, end))]
        padded = F.pad(x, _torch_pads(begin, end)) if any(begin + end) else x
        ones = torch.ones((x.shape[1], 1, *k), dtype=x.dtype, device=x.device)
        return _CONV[nd](padded.abs() ** p, ones, None, s, 0, d, x.shape[1]) ** (1.0 / p)

    return lppool


@_op("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _b_global(node, a, ctx):
    kind = node.op_type
    p = float(a.get("p", 2))

    def pool(x):
        dims = tuple(range(2, x.dim()))
        if kind == "GlobalAveragePool":
            return x.mean(dim=dims, keepdim=True)
        if kind == "GlobalMaxPool":
            return x.amax(dim=dims, keepdim=True)
        return (x.abs() ** p).sum(dim=dims, keepdim=True) ** (1.0 / p)

    return pool


@_op("LRN")
def _b_lrn(node, a, ctx):
    size = int(a["size"])
    alpha, beta, bias = float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)), float(a.get("bias", 1.0))
    before = (size - 1) // 2
    after = size - 1 - before

    def lrn(x):
        n, c = x.shape[:2]
        sq = (x * x).reshape(n, 1, c, -1)
        summed = F.avg_pool2d(F.pad(sq, (0, 0, before, after)), (size, 1), 1) * size
        return x / (bias + alpha / size * summed.reshape(x.shape)) ** beta

    return lrn


@_op("BatchNormalization")
def _b_batchnorm(node, a, ctx):
    eps = float(a.get("epsilon", 1e-5))
    momentum = float(a.get("momentum", 0.9))
    module = ctx.module
    extra_outputs = len([o for o in node.output if o]) > 1

    def batchnorm(x, scale, bias, mean, var):
        training = module.training and module.train_bn
        y = F.batch_norm(x, mean, var, scale, bias, training, 1.0 - momentum, eps)
        return (y, mean, var) if extra_outputs else y

    return batchnorm


@_op("InstanceNormalization")
def _b_instancenorm(node, a, ctx):
    eps = float(a.get("epsilon", 1e-5))
    return lambda x, scale, bias: F.instance_norm(x, weight=scale, bias=bias, eps=eps)


@_op("LayerNormalization")
def _b_layernorm(node, a, ctx):
    eps = float(a.get("epsilon", 1e-5))
    axis = int(a.get("axis", -1))
    if len([o for o in node.output if o]) > 1:
        raise DenseError(f"node {_label(node)}: LayerNormalization's mean/inv_std outputs are not supported")

    def layernorm(x, scale, bias=None):
        ax = axis % x.dim()
        shape = tuple(x.shape[ax:])
        return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape), eps)

    return layernorm


@_op("Gemm")
def _b_gemm(node, a, ctx):
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))

    def gemm(x, w, c=None):
        if ta:
            x = x.transpose(0, 1)
        if tb:
            w = w.transpose(0, 1)
        y = x @ w
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c if beta == 1.0 else beta * c)
        return y

    return gemm


_op("MatMul")(lambda node, a, ctx: torch.matmul)


def _int_div(x, y):
    if x.dtype.is_floating_point or y.dtype.is_floating_point:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


def _pow(x, y):
    out = torch.pow(x, y)
    return out if out.dtype == x.dtype else out.to(x.dtype)


_BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _int_div, "Pow": _pow,
    "Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
    "BitShift": None,
}
for _name, _fn in _BINARY.items():
    if _fn is not None:
        _op(_name)(lambda node, a, ctx, _fn=_fn: _fn)


@_op("Mod")
def _b_mod(node, a, ctx):
    return torch.fmod if int(a.get("fmod", 0)) else torch.remainder


@_op("Sum", "Max", "Min", "Mean")
def _b_variadic(node, a, ctx):
    kind = node.op_type
    step = {"Sum": torch.add, "Mean": torch.add, "Max": torch.maximum, "Min": torch.minimum}[kind]

    def variadic(*xs):
        out = xs[0]
        for x in xs[1:]:
            out = step(out, x)
        return out / len(xs) if kind == "Mean" else out

    return variadic


@_op("Where")
def _b_where(node, a, ctx):
    return lambda c, x, y: torch.where(c.bool(), x, y)


_UNARY = {
    "Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Floor": torch.floor,
    "Ceil": torch.ceil, "Round": torch.round, "Erf": torch.erf, "Sign": torch.sign, "Sin": torch.sin,
    "Cos": torch.cos, "Softplus": F.softplus, "Softsign": F.softsign, "Not": torch.logical_not,
    "Mish": F.mish, "IsNaN": torch.isnan,
}
for _name, _fn in _UNARY.items():
    _op(_name)(lambda node, a, ctx, _fn=_fn: _fn)


@_op("Identity")
def _b_identity(node, a, ctx):
    return lambda x: x


@_op("Dropout")
def _b_dropout(node, a, ctx):
    """Inference semantics (identity), as the exported graphs were traced in eval mode."""
    mask = len(node.output) > 1 and bool(node.output[1])

    def dropout(x, ratio=None, training=None):
        if training is not None and bool(_scalar(training)):
            raise DenseError(f"node {_label(node)}: Dropout with training_mode=True is not supported")
        return (x, torch.ones_like(x, dtype=torch.bool)) if mask else x

    return dropout


@_op("LeakyRelu")
def _b_leaky(node, a, ctx):
    alpha = float(a.get("alpha", 0.01))
    return lambda x: F.leaky_relu(x, alpha)


@_op("Elu")
def _b_elu(node, a, ctx):
    alpha = float(a.get("alpha", 1.0))
    return lambda x: F.elu(x, alpha)


@_op("Celu")
def _b_celu(node, a, ctx):
    alpha = float(a.get("alpha", 1.0))
    return lambda x: F.celu(x, alpha)


@_op("Selu")
def _b_selu(node, a, ctx):
    alpha = float(a.get("alpha", 1.67326319217681884765625))
    gamma = float(a.get("gamma", 1.05070102214813232421875))
    return lambda x: gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@_op("ThresholdedRelu")
def _b_trelu(node, a, ctx):
    alpha = float(a.get("alpha", 1.0))
    return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))


@_op("HardSigmoid")
def _b_hardsigmoid(node, a, ctx):
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)


@_op("HardSwish")
def _b_hardswish(node, a, ctx):
    return lambda x: x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


@_op("PRelu")
def _b_prelu(node, a, ctx):
    return lambda x, slope: torch.where(x < 0, x * slope, x)


@_op("Gelu")
def _b_gelu(node, a, ctx):
    approximate = a.get("approximate", "none")
    return lambda x: F.gelu(x, approximate=approximate)


@_op("Clip")
def _b_clip(node, a, ctx):
    if ctx.opset < 11:
        lo, hi = a.get("min"), a.get("max")
        return lambda x: torch.clamp(x, lo, hi)

    def clip(x, lo=None, hi=None):
        if lo is not None:
            x = torch.maximum(x, lo.to(x.dtype))
        if hi is not None:
            x = torch.minimum(x, hi.to(x.dtype))
        return x

    return clip


@_op("Softmax", "LogSoftmax")
def _b_softmax(node, a, ctx):
    fn = F.softmax if node.op_type == "Softmax" else F.log_softmax
    if ctx.opset >= 13:
        axis = int(a.get("axis", -1))
        return lambda x: fn(x, dim=axis)
    axis = int(a.get("axis", 1))

    def softmax_2d(x):
        ax = axis % x.dim() if x.dim() else 0
        flat = x.reshape(math.prod(x.shape[:ax]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return softmax_2d


@_op("Cast")
def _b_cast(node, a, ctx):
    dtype = _ONNX_TO_TORCH.get(int(a["to"]))
    if dtype is None:
        raise DenseError(f"node {_label(node)}: Cast to ONNX type {a['to']} is not supported")
    return lambda x: x.to(dtype)


@_op("CastLike")
def _b_castlike(node, a, ctx):
    return lambda x, like: x.to(like.dtype)


@_op("Shape")
def _b_shape(node, a, ctx):
    start, end = a.get("start", 0), a.get("end")

    def shape(x):
        dims = list(x.shape)
        return torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64)

    return shape


@_op("Size")
def _b_size(node, a, ctx):
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64)


@_op("Reshape")
def _b_reshape(node, a, ctx):
    allowzero = int(a.get("allowzero", 0))

    def reshape(x, shape):
        dims = _ints(shape)
        if not allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)

    return reshape


@_op("Flatten")
def _b_flatten(node, a, ctx):
    axis = int(a.get("axis", 1))

    def flatten(x):
        ax = axis % x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:ax]), math.prod(x.shape[ax:]))

    return flatten


@_op("Transpose")
def _b_transpose(node, a, ctx):
    perm = a.get("perm")
    return lambda x: x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


def _axes_arg(a, ctx, since: int):
    """Axes from the attribute (before opset ``since``) or from the optional second input."""
    if ctx.opset < since:
        fixed = a.get("axes")
        return lambda given: fixed
    return lambda given: None if given is None else _ints(given)


@_op("Squeeze")
def _b_squeeze(node, a, ctx):
    axes_of = _axes_arg(a, ctx, 13)

    def squeeze(x, axes=None):
        ax = axes_of(axes)
        if ax is None:
            return x.squeeze()
        return x.squeeze(tuple(v % x.dim() for v in ax)) if ax else x

    return squeeze


@_op("Unsqueeze")
def _b_unsqueeze(node, a, ctx):
    axes_of = _axes_arg(a, ctx, 13)

    def unsqueeze(x, axes=None):
        ax = axes_of(axes)
        rank = x.dim() + len(ax)
        for v in sorted(v % rank for v in ax):
            x = x.unsqueeze(v)
        return x

    return unsqueeze


@_op("Concat")
def _b_concat(node, a, ctx):
    axis = int(a["axis"])
    return lambda *xs: torch.cat([x for x in xs if x is not None], dim=axis)


@_op("Gather")
def _b_gather(node, a, ctx):
    axis = int(a.get("axis", 0))

    def gather(x, idx):
        ax = axis % x.dim()
        idx = idx.long()
        idx = torch.where(idx < 0, idx + x.shape[ax], idx)
        out = x.index_select(ax, idx.reshape(-1))
        return out.reshape((*x.shape[:ax], *idx.shape, *x.shape[ax + 1 :]))

    return gather


@_op("GatherElements")
def _b_gather_elements(node, a, ctx):
    axis = int(a.get("axis", 0))

    def gather_elements(x, idx):
        ax = axis % x.dim()
        idx = idx.long()
        return torch.gather(x, ax, torch.where(idx < 0, idx + x.shape[ax], idx))

    return gather_elements


@_op("Slice")
def _b_slice(node, a, ctx):
    if ctx.opset < 10:
        fixed = (a.get("starts"), a.get("ends"), a.get("axes"), None)
    else:
        fixed = None

    def slice_(x, starts=None, ends=None, axes=None, steps=None):
        if fixed is not None:
            starts, ends, axes, steps = fixed
        st, en = _ints(starts), _ints(ends)
        ax = _ints(axes) if axes is not None and len(_ints(axes)) else list(range(len(st)))
        sp = _ints(steps) if steps is not None and len(_ints(steps)) else [1] * len(st)
        for s, e, axis, step in zip(st, en, ax, sp):
            axis %= x.dim()
            n = x.shape[axis]
            s = s + n if s < 0 else s
            e = e + n if e < 0 else e
            if step > 0:
                s, e = min(max(s, 0), n), min(max(e, 0), n)
                index = [slice(None)] * x.dim()
                index[axis] = slice(s, e, step)
                x = x[tuple(index)]
            else:
                s, e = min(max(s, 0), n - 1), min(max(e, -1), n - 1)
                positions = torch.arange(s, e, step, device=x.device)
                x = x.index_select(axis, positions)
        return x

    return slice_


@_op("Pad")
def _b_pad(node, a, ctx):
    mode = a.get("mode", "constant")
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise DenseError(f"node {_label(node)}: Pad mode '{mode}' is not supported")
    fixed = (a.get("pads"), a.get("value", 0.0)) if ctx.opset < 11 else None

    def pad(x, pads=None, value=None, axes=None):
        if fixed is not None:
            p, v = list(fixed[0]), fixed[1]
        else:
            p = _ints(pads)
            v = 0.0 if value is None or value.numel() == 0 else _scalar(value)
        rank = x.dim()
        ax = [v_ % rank for v_ in _ints(axes)] if axes is not None else list(range(rank))
        begin, end = [0] * rank, [0] * rank
        n = len(ax)
        for i, axis in enumerate(ax):
            begin[axis], end[axis] = p[i], p[n + i]
        first = next((i for i in range(rank) if begin[i] or end[i]), rank)
        if first == rank:
            return x
        torch_pads = _torch_pads(begin[first:], end[first:])
        if torch_mode == "constant":
            return F.pad(x, torch_pads, value=v)
        return F.pad(x, torch_pads, mode=torch_mode)

    return pad


@_op("Constant")
def _b_constant(node, a, ctx):  # never called: Constant outputs are resolved when the module is built
    raise AssertionError


@_op("ConstantOfShape")
def _b_constant_of_shape(node, a, ctx):
    value = a.get("value")
    fill = numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
    dtype = _ONNX_TO_TORCH[value.data_type] if value is not None else torch.float32
    module = ctx.module

    def constant_of_shape(shape):
        device = module.device if dtype.is_floating_point else "cpu"
        return torch.full(_ints(shape), fill.item(), dtype=dtype, device=device)

    return constant_of_shape


@_op("Expand")
def _b_expand(node, a, ctx):
    def expand(x, shape):
        return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))

    return expand


@_op("Tile")
def _b_tile(node, a, ctx):
    return lambda x, repeats: x.repeat(*_ints(repeats))


@_op("Split")
def _b_split(node, a, ctx):
    axis = int(a.get("axis", 0))
    n_out = len(node.output)
    fixed = a.get("split") if ctx.opset < 13 else None
    num_outputs = a.get("num_outputs")

    def split(x, sizes=None):
        ax = axis % x.dim()
        parts = list(fixed) if fixed is not None else _ints(sizes) if sizes is not None else None
        if not parts:
            length = x.shape[ax]
            if num_outputs is not None:
                chunk = math.ceil(length / num_outputs)
                parts = [min(chunk, length - i * chunk) for i in range(num_outputs)]
            else:
                parts = [length // n_out] * n_out
        return tuple(torch.split(x, parts, dim=ax))

    return split


@_op("Range")
def _b_range(node, a, ctx):
    return lambda start, limit, delta: torch.arange(_scalar(start), _scalar(limit), _scalar(delta), dtype=start.dtype)


_REDUCE = {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: (x * x).sum(dim=d, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(dim=d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


def _reduce_prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


@_op(*_REDUCE, "ReduceProd")
def _b_reduce(node, a, ctx):
    kind = node.op_type
    fn = _REDUCE.get(kind)
    keep = bool(a.get("keepdims", 1))
    noop = bool(a.get("noop_with_empty_axes", 0))
    since = 13 if kind == "ReduceSum" else 18
    axes_of = _axes_arg(a, ctx, since)

    def reduce(x, axes=None):
        ax = axes_of(axes)
        if not ax:
            if noop:
                return x
            ax = list(range(x.dim()))
        dims = tuple(v % x.dim() for v in ax)
        if kind == "ReduceProd":
            return _reduce_prod(x, dims, keep)
        return fn(x, dims, keep)

    return reduce


@_op("ArgMax", "ArgMin")
def _b_argmax(node, a, ctx):
    axis, keep = int(a.get("axis", 0)), bool(a.get("keepdims", 1))
    last = bool(a.get("select_last_index", 0))
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin

    def arg(x):
        if not last:
            return fn(x, dim=axis, keepdim=keep)
        ax = axis % x.dim()
        return x.shape[ax] - 1 - fn(x.flip(ax), dim=ax, keepdim=keep)

    return arg


@_op("TopK")
def _b_topk(node, a, ctx):
    axis, largest, sort = int(a.get("axis", -1)), bool(a.get("largest", 1)), bool(a.get("sorted", 1))

    def topk(x, k):
        values, indices = torch.topk(x, int(_scalar(k)), dim=axis, largest=largest, sorted=sort)
        return values, indices

    return topk


@_op("NonZero")
def _b_nonzero(node, a, ctx):
    return lambda x: torch.nonzero(x).t()


@_op("Einsum")
def _b_einsum(node, a, ctx):
    equation = a["equation"]
    return lambda *xs: torch.einsum(equation, *xs)


@_op("DepthToSpace", "SpaceToDepth")
def _b_depth_space(node, a, ctx):
    b = int(a["blocksize"])
    mode = a.get("mode", "DCR")
    to_space = node.op_type == "DepthToSpace"

    def depth_space(x):
        n, c, h, w = x.shape
        if not to_space:
            y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
            return y.reshape(n, c * b * b, h // b, w // b)
        if mode == "DCR":
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // (b * b), h * b, w * b)

    return depth_space


def _resize_coords(mode: str, m: int, n: int, scale: float, dtype=torch.float64) -> torch.Tensor:
    x = torch.arange(m, dtype=dtype)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if m > 1 else torch.zeros_like(x)
    if mode == "align_corners":
        return x * (n - 1) / (m - 1) if m > 1 else torch.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel_symmetric":
        adjustment = m / (scale * n)
        return n / 2 * (1 - adjustment) + (x + 0.5) / scale - 0.5
    raise DenseError(f"Resize coordinate_transformation_mode '{mode}' is not supported")


def _nearest_index(coords: torch.Tensor, mode: str, n: int) -> torch.Tensor:
    if mode == "round_prefer_floor":
        idx = torch.ceil(coords - 0.5)
    elif mode == "round_prefer_ceil":
        idx = torch.floor(coords + 0.5)
    elif mode == "floor":
        idx = torch.floor(coords)
    elif mode == "ceil":
        idx = torch.ceil(coords)
    else:
        raise DenseError(f"Resize nearest_mode '{mode}' is not supported")
    return idx.long().clamp(0, n - 1)


@_op("Resize")
def _b_resize(node, a, ctx):
    """Nearest and (n-)linear resizing, every coordinate transformation but tf_crop_and_resize,
    axis by axis (separable, so N-linear is exactly ONNX's)."""
    mode = a.get("mode", "nearest")
    transform = a.get("coordinate_transformation_mode", "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear") or int(a.get("antialias", 0)) or transform == "tf_crop_and_resize":
        raise DenseError(
            f"node {_label(node)}: Resize mode '{mode}' (coordinate_transformation_mode '{transform}', "
            f"antialias {a.get('antialias', 0)}) is not supported; nearest and linear without antialias are"
        )
    axes_attr = a.get("axes")
    if ctx.opset < 11:
        raise DenseError(f"node {_label(node)}: Resize below opset 11 is not supported")

    def resize(x, roi=None, scales=None, sizes=None):
        rank = x.dim()
        axes = [v % rank for v in axes_attr] if axes_attr else list(range(rank))
        if sizes is not None and sizes.numel():
            targets = _ints(sizes)
            factors = [t / x.shape[ax] for t, ax in zip(targets, axes)]
        else:
            factors = [float(v) for v in scales.reshape(-1).tolist()]
            targets = [int(math.floor(x.shape[ax] * f)) for ax, f in zip(axes, factors)]
        for ax, m, f in zip(axes, targets, factors):
            n = x.shape[ax]
            if m == n and f == 1.0:
                continue
            coords = _resize_coords(transform, m, n, f)
            if mode == "nearest":
                x = x.index_select(ax, _nearest_index(coords, nearest, n).to(x.device))
                continue
            coords = coords.clamp(0, n - 1)
            lo = torch.floor(coords).long()
            hi = (lo + 1).clamp(max=n - 1)
            w = (coords - lo).to(x.dtype).to(x.device)
            shape = [1] * rank
            shape[ax] = m
            w = w.reshape(shape)
            x = x.index_select(ax, lo.to(x.device)) * (1 - w) + x.index_select(ax, hi.to(x.device)) * w
        return x

    return resize


@_op("Hardmax")
def _b_hardmax(node, a, ctx):
    axis = int(a.get("axis", -1 if ctx.opset >= 13 else 1))

    def hardmax(x):
        if ctx.opset >= 13:
            return F.one_hot(x.argmax(dim=axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)
        ax = axis % x.dim()
        flat = x.reshape(math.prod(x.shape[:ax]), -1)
        return F.one_hot(flat.argmax(dim=1), flat.shape[1]).to(x.dtype).reshape(x.shape)

    return hardmax


@_op("LpNormalization")
def _b_lpnorm(node, a, ctx):
    axis, p = int(a.get("axis", -1)), int(a.get("p", 2))
    return lambda x: x / x.abs().pow(p).sum(dim=axis, keepdim=True).pow(1.0 / p)


@_op("If")
def _b_if(node, a, ctx):
    then_prog = _Program(a["then_branch"], ctx.module, ctx.opset, ctx.outer)
    else_prog = _Program(a["else_branch"], ctx.module, ctx.opset, ctx.outer)

    def if_(env, cond):
        prog = then_prog if bool(_scalar(cond)) else else_prog
        outs = prog.run(env)
        return outs[0] if len(outs) == 1 else tuple(outs)

    if_.needs_env = True
    return if_


#: Every op type the interpreter runs (domain "" / ai.onnx).
SUPPORTED_OPS = frozenset(_BUILDERS)


# --------------------------------------------------------------------------------------------
# graph programs
# --------------------------------------------------------------------------------------------


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {i.name for i in g.initializer}
            for inner in g.node:
                local |= set(inner.output)
            for inner in g.node:
                names |= {n for n in inner.input if n and n not in local}
                names |= {n for n in _subgraph_reads(inner) if n not in local}
    return names


def _topological(graph: onnx.GraphProto, known: set[str]) -> list[onnx.NodeProto]:
    """The nodes in an order where each runs after its producers: the file's order when it is
    one already (exporters write sorted graphs), else the earliest ready node first."""
    nodes = list(graph.node)
    needs = [({n for n in node.input if n} | _subgraph_reads(node)) for node in nodes]
    available = set(known)
    for deps, node in zip(needs, nodes):
        if deps - available:
            break
        available.update(o for o in node.output if o)
    else:
        return nodes
    producers = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producers[out] = i
    users: dict[int, set[int]] = collections.defaultdict(set)
    waiting = []
    for i, deps in enumerate(needs):
        missing = {d for d in deps if d not in known}
        for d in missing:
            if d not in producers:
                raise DenseError(
                    f"node {_label(nodes[i])} reads '{d}', which no node, graph input or initializer produces"
                )
        sources = {producers[d] for d in missing}
        for j in sources:
            users[j].add(i)
        waiting.append(len(sources))
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in users[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        done = set(order)
        stuck = next(nodes[i] for i in range(len(nodes)) if i not in done)
        raise DenseError(f"node {_label(stuck)}: the graph has a cycle through it")
    return [nodes[i] for i in order]


class _Step:
    __slots__ = ("name", "op_type", "inputs", "outputs", "fn", "needs_env", "host_args", "release")

    def __init__(self, node: onnx.NodeProto, fn):
        self.name = node.name or (node.output[0] if node.output else "")
        self.op_type = node.op_type
        self.inputs = tuple(node.input)
        self.outputs = tuple(node.output)
        self.fn = fn
        self.needs_env = getattr(fn, "needs_env", False)
        self.host_args = node.op_type in _HOST_ARG_OPS
        self.release: tuple[str, ...] = ()


def _align(args: list) -> list:
    """Move CPU tensors to the device of the others when they are on an accelerator."""
    device = None
    for t in args:
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            device = t.device
            break
    if device is None:
        return args
    return [t.to(device) if isinstance(t, torch.Tensor) and t.device != device else t for t in args]


class _Program:
    """A (sub)graph compiled into steps. Its tensors live in the owning module."""

    def __init__(self, graph: onnx.GraphProto, module: "OnnxGraphModule", opset: int, outer: set[str], arrays=None):
        self.module = module
        self.graph_inputs = [i.name for i in graph.input]
        self.outputs = [o.name for o in graph.output]
        known = set(outer) | set(self.graph_inputs)
        for init in graph.initializer:
            module._add_initializer(graph, init, (arrays or {}).get(init.name))
            known.add(init.name)
        constants = []
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                constants.append(node)
                known.add(node.output[0])
        for node in constants:
            module._add_constant(node)
        constant_ids = {id(n) for n in constants}
        ordered = _topological(onnx.GraphProto(node=[n for n in graph.node if id(n) not in constant_ids]), known)
        self.steps: list[_Step] = []
        scope = known | {o for n in graph.node for o in n.output}
        ctx = _Context(module, opset, scope)
        for node in ordered:
            if node.domain not in ("", "ai.onnx"):
                raise DenseError(
                    f"node {_label(node)}: op domain '{node.domain}' is not supported by onnx-dense's torch interpreter"
                )
            builder = _BUILDERS.get(node.op_type)
            if builder is None:
                raise DenseError(
                    f"node {_label(node)}: op {node.op_type} is not supported by onnx-dense's torch interpreter "
                    f"(supported: {len(SUPPORTED_OPS)} ops, see onnx_dense.train.graph_module.SUPPORTED_OPS)"
                )
            self.steps.append(_Step(node, builder(node, _attrs(node), ctx)))
        # free intermediate values after their last use (top-level only)
        last: dict[str, int] = {}
        for i, (step, node) in enumerate(zip(self.steps, ordered)):
            for name in (*step.inputs, *_subgraph_reads(node)):
                if name:
                    last[name] = i
        keep = set(self.outputs)
        releases = collections.defaultdict(list)
        produced = {o for s in self.steps for o in s.outputs}
        for name, i in last.items():
            if name in produced and name not in keep:
                releases[i].append(name)
        for i, step in enumerate(self.steps):
            step.release = tuple(releases.get(i, ()))

    def run(self, env: dict | collections.ChainMap, *, release: bool = False) -> list:
        local = collections.ChainMap({}, env) if not release else env
        for step in self.steps:
            try:
                args = [local[n] if n else None for n in step.inputs]
            except KeyError as exc:
                raise DenseError(f"node '{step.name}' ({step.op_type}): input {exc} was not given") from None
            if not step.host_args:
                args = _align(args)
            try:
                out = step.fn(local, *args) if step.needs_env else step.fn(*args)
            except DenseError:
                raise
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                shapes = ", ".join(str(list(t.shape)) if isinstance(t, torch.Tensor) else "-" for t in args)
                raise DenseError(f"node '{step.name}' ({step.op_type}) failed on inputs [{shapes}]: {text}") from exc
            if isinstance(out, (tuple, list)):
                for name, value in zip(step.outputs, out):
                    if name:
                        local[name] = value
            else:
                local[step.outputs[0]] = out
            if release:
                for name in step.release:
                    local.pop(name, None)
        return [local[n] for n in self.outputs]


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------


_ELEMENTWISE_FIRST = {"Mul", "Sub", "Add", "Div", "Cast", "Identity", "Clip", "Relu"}


def _channels_last(graph: onnx.GraphProto, name: str, rank: int) -> bool:
    """Whether the first op that moves axes after input ``name`` (past elementwise ops: a Keras
    Rescaling's Mul and Sub) is the Transpose from channels-last to channels-first."""
    perm = [0, rank - 1, *range(1, rank - 1)]
    reached, changed = {name}, True
    while changed:
        changed = False
        for node in graph.node:
            if not any(i in reached for i in node.input) or all(o in reached for o in node.output):
                continue
            if node.op_type == "Transpose":
                if [list(a.ints) for a in node.attribute if a.name == "perm"] == [perm]:
                    return True
            elif node.op_type in _ELEMENTWISE_FIRST:
                reached.update(node.output)
                changed = True
    return False


class OnnxGraphModule(nn.Module):
    """Run (and train) an ONNX model in PyTorch, node by node.

    ``model``: a path, ``onnx.ModelProto`` or onnx-ir ``Model``. ``train_bn``: in training mode,
    BatchNormalization uses batch statistics and updates its running statistics (default: it
    stays in inference mode, as the paper fine-tunes). ``trainable``: None for the default rule
    (see the module docstring), a collection of ONNX names, or a predicate on the name.

    ``module(x)`` returns the first graph output (a tuple when the graph has several);
    ``module.run({name: tensor})`` returns every output by name.
    """

    def __init__(self, model, *, train_bn: bool = False, trainable: Iterable[str] | Callable[[str], bool] | None = None):
        super().__init__()
        proto, arrays, source = load_onnx(model)
        self.source_path = source
        self.train_bn = bool(train_bn)
        self._proto = proto if source is None else None
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.metadata_props = {p.key: p.value for p in proto.metadata_props}
        if trainable is None or callable(trainable):
            self._trainable_fn = trainable
        else:
            names = set(trainable)
            self._trainable_fn = names.__contains__
        self._roles = self._initializer_roles(proto.graph)
        self._attr_of: dict[str, str] = {}  # ONNX name -> attribute name (parameters and buffers)
        self._host: dict[str, torch.Tensor] = {}  # integer initializers and constants (CPU)
        self._taken: set[str] = set(dir(self))
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)
        initializers = {i.name for i in proto.graph.initializer}
        self.input_names = [i.name for i in proto.graph.input if i.name not in initializers]
        self.output_names = [o.name for o in proto.graph.output]
        #: static dims per input/output (None for a symbolic dim; None for an unknown rank)
        self.input_shapes = {i.name: _dims(i) for i in proto.graph.input if i.name not in initializers}
        self.output_shapes = {o.name: _dims(o) for o in proto.graph.output}
        #: inputs the graph first moves from channels-last to axis 1 (tf2onnx: Transpose to NCHW)
        self.channels_last_inputs = {name for name, dims in self.input_shapes.items()
                                     if dims is not None and len(dims) > 2 and _channels_last(proto.graph, name, len(dims))}
        self._program = _Program(proto.graph, self, self.opset, set(), arrays)

    # ---- registration ------------------------------------------------------------------------

    @staticmethod
    def _initializer_roles(graph: onnx.GraphProto) -> dict[str, set[str]]:
        roles: dict[str, set[str]] = collections.defaultdict(set)
        for node in graph.node:
            for k, name in enumerate(node.input):
                if (node.op_type, k) in _BN_STATS:
                    roles[name].add("stat")
                elif (node.op_type, k) in _CONFIG_INPUTS:
                    roles[name].add("config")
                else:
                    roles[name].add("data")
        return roles

    def _is_trainable(self, name: str, init: onnx.TensorProto) -> bool:
        if self._trainable_fn is not None:
            return bool(self._trainable_fn(name)) and init.data_type in _FLOAT_TYPES
        roles = self._roles.get(name, set())
        return init.data_type in _FLOAT_TYPES and len(init.dims) > 0 and "data" in roles and not roles & {"stat", "config"}

    def _add_initializer(self, graph, init: onnx.TensorProto, array: np.ndarray | None) -> None:
        if init.name in self._attr_of or init.name in self._host:
            return
        if array is None:
            try:
                array = numpy_helper.to_array(init)
            except Exception as exc:
                raise DenseError(f"initializer '{init.name}' could not be read ({str(exc).splitlines()[0][:200]})") from None
        tensor = _to_tensor(array)
        if init.data_type not in _FLOAT_TYPES:
            self._host[init.name] = tensor
            return
        attr = _escape(init.name, self._taken)
        self._attr_of[init.name] = attr
        if self._is_trainable(init.name, init):
            self.register_parameter(attr, nn.Parameter(tensor))
        else:
            self.register_buffer(attr, tensor)

    def _add_constant(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        name = node.output[0]
        if "value" in a:
            array = numpy_helper.to_array(a["value"])
        elif "value_float" in a:
            array = np.array(a["value_float"], dtype=np.float32)
        elif "value_floats" in a:
            array = np.array(list(a["value_floats"]), dtype=np.float32)
        elif "value_int" in a:
            array = np.array(a["value_int"], dtype=np.int64)
        elif "value_ints" in a:
            array = np.array(list(a["value_ints"]), dtype=np.int64)
        else:
            raise DenseError(f"node {_label(node)}: Constant with attribute {', '.join(a) or 'none'} is not supported")
        tensor = _to_tensor(array)
        if tensor.dtype.is_floating_point:
            attr = _escape("const_" + name, self._taken)
            self._attr_of[name] = attr
            self.register_buffer(attr, tensor, persistent=False)
        else:
            self._host[name] = tensor

    # ---- running -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def _env(self) -> dict:
        env = dict(self._host)
        for name, attr in self._attr_of.items():
            env[name] = getattr(self, attr)
        return env

    def run(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Every graph output by name, for inputs given by name (tensors or numpy arrays)."""
        env = self._env()
        for name in self.input_names:
            if name not in feeds:
                raise DenseError(f"model input '{name}' was not given (inputs: {', '.join(self.input_names)})")
            value = feeds[name]
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
            env[name] = value.to(self.device) if value.device != self.device else value
        outs = self._program.run(env, release=True)
        return dict(zip(self.output_names, outs))

    def forward(self, *args, **kwargs):
        if len(args) > len(self.input_names):
            raise DenseError(f"the model takes {len(self.input_names)} input(s), got {len(args)}")
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        outs = self.run(feeds)
        values = [outs[n] for n in self.output_names]
        return values[0] if len(values) == 1 else tuple(values)

    # ---- ONNX-named tensors ------------------------------------------------------------------

    def onnx_names(self) -> dict[str, str]:
        """ONNX name -> attribute name of every float initializer (parameters and buffers)."""
        persistent = {k for k, _ in self.state_dict().items()}
        return {n: a for n, a in self._attr_of.items() if a in persistent}

    def named_parameters_onnx(self):
        """(ONNX name, Parameter) of every trainable tensor."""
        params = dict(self.named_parameters())
        for name, attr in self._attr_of.items():
            if attr in params:
                yield name, params[attr]

    def state_dict_onnx(self) -> dict[str, torch.Tensor]:
        """Every float initializer (trained or not) by its ONNX name, detached."""
        state = self.state_dict()
        return {name: state[attr].detach() for name, attr in self._attr_of.items() if attr in state}

    def load_state_dict_onnx(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Copy tensors given by ONNX name into this module (shapes must match)."""
        own = self.state_dict_onnx()
        missing = [n for n in own if n not in state]
        unknown = [n for n in state if n not in own]
        if strict and (missing or unknown):
            parts = []
            if missing:
                parts.append(f"{len(missing)} of the model's tensors missing (e.g. '{missing[0]}')")
            if unknown:
                parts.append(f"{len(unknown)} unknown to the model (e.g. '{unknown[0]}')")
            raise DenseError("weights do not fit this model: " + "; ".join(parts))
        with torch.no_grad():
            for name, value in state.items():
                if name not in own:
                    continue
                target = getattr(self, self._attr_of[name])
                value = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
                if tuple(value.shape) != tuple(target.shape):
                    raise DenseError(
                        f"weight '{name}': shape {list(value.shape)} does not fit the model's {list(target.shape)}"
                    )
                target.copy_(value.to(target.dtype))
