"""Analyse: where every tensor's positions sit, in the original and in the dense model.

This pass changes nothing in the graph. It walks the nodes in order and attaches

* a :class:`~onnx_dense.grid.Grid` to every image-derived value (``value.meta[GRID]``), and
* a plan to every node the rewrite must change (``node.meta[PLAN]``),

and leaves an :class:`Analysis` in ``model.meta[ANALYSIS]`` for the rewrite, the metadata
and ``inspect``. Everything that cannot be made equivalent is refused here, before any
mutation, with a message naming the node.

Rules (per spatial axis; S stride, e eST, D = S/e dense grid stride, R target):

* Conv / MaxPool / AveragePool / LpPool with stride s: the dense node keeps
  s' = gcd(s, R/D) while e = 1 and removes the rest; it reads its input with dilation d*e
  and pads p*e; afterwards S *= s and e *= s/s'.
* Pointwise ops (activations, BatchNormalization, LRN, elementwise arithmetic, channel
  Softmax/Concat/Split/Slice/Gather/Reduce) keep the grid; operands must agree on S and e.
* Operands of a join (Add, Concat, ...) that agree in the original but not in dense length
  are cropped to the shortest at the end.
* Pad and Slice on spatial axes scale their amounts by e (constant padding only). A Pad of
  the raw input, before any spatial op says which axes are spatial (Keras' ZeroPadding2D
  before the first Conv), moves the receptive field's start by its begin pads.
* Global pooling (GlobalAveragePool/GlobalMaxPool, ReduceMean/ReduceMax over all spatial
  axes) in a head becomes a window of the original coarse size, dilated by e. Its result
  broadcast back onto a feature map (squeeze-and-excitation) is global context, which no
  single dilated tensor reproduces: refused when e > 1, left alone when e = 1. The context
  survives 1x1 windows on the 1x1 map (an SE block's Convs), a keepdims=0 vector given its
  unit axes back (Reshape((1, 1, C)), Unsqueeze) and a Resize back to the map's size
  (DeepLab's image pooling, a broadcast).
* Flatten/Reshape/Squeeze that folds spatial axes: if they are 1x1 in the original the
  dense tensor moves its positions next to the batch axis ("inserted" layout, channels
  last) so Gemm/MatMul/Softmax over features work per position; otherwise the folded
  tensor must reach a Gemm/MatMul, which becomes a Conv with the original spatial size as
  kernel (the paper's fully connected -> convolution).
* Upsampling (Resize, strided ConvTranspose, DepthToSpace) is allowed only where e = 1.
* A head vector (N, C) reshaped or unsqueezed to (N, 1, 1, C) or (N, C, 1, 1) is a map
  again: its dense tensor (N, positions, C) is kept or transposed to match.
* Every output must end on a dense grid D = min(R, S).

Strategy "fragments" (``AnalyseGrid(R, "fragments")``, lowered by passes/fragments.py): every
phase runs the original ops, so global context broadcast back, whole-image normalisation,
non-constant padding, shapes read from dense tensors and upsampling are allowed at e > 1; an
upsampling by u leaves e/u (or 1 when u is a multiple of e; anything else is refused).
``per_phase_global`` (dilate): global context broadcast back is allowed at e > 1 and lowered
by passes/phase_global.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnx_dense.errors import DenseError, UnsupportedNodeError, node_label
from onnx_dense.grid import GRID, PLAN, Grid, fmt, merge_rf, split_stride, trivial_grid
from onnx_dense.passes import _ir
from onnx_dense.passes.fold_constants import ASSUMED_DIMS

ANALYSIS = "onnx_dense.analysis"
DENSE_SHAPE = "onnx_dense.dense_shape"  # Value.meta flag: computed from the shape of a dense tensor

MIN_OPSET, MAX_OPSET = 11, 23


# ----------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class SpatialPlan:
    """Conv/pool: keep strides ``kept``, scale dilations and pads by ``est_in``."""

    params: _ir.WindowParams
    est_in: tuple[int, ...]
    kept: tuple[int, ...]

    @property
    def changes(self) -> bool:
        return any(e > 1 for e in self.est_in) or self.kept != self.params.strides

    @property
    def dilations(self) -> tuple[int, ...]:
        return tuple(d * e for d, e in zip(self.params.dilations, self.est_in))

    @property
    def pads_begin(self) -> tuple[int, ...]:
        return tuple(p * e for p, e in zip(self.params.pads_begin, self.est_in))

    @property
    def pads_end(self) -> tuple[int, ...]:
        return tuple(p * e for p, e in zip(self.params.pads_end, self.est_in))


@dataclasses.dataclass(frozen=True)
class GlobalPlan:
    """Global pooling in a head -> window of ``kernel`` dilated by ``est``."""

    kind: str  # "avg" or "max"
    kernel: tuple[int, ...]
    est: tuple[int, ...]
    spatial_axes: tuple[int, ...]
    keepdims: bool
    to_channels_last: tuple[int, ...] | None  # Transpose perm when the pooled axes are dropped


@dataclasses.dataclass(frozen=True)
class JoinPlan:
    """Add/Concat/...: operands of equal original size whose dense maps differ in length are
    cropped at the end to the shortest (the extra positions exist on one side only)."""

    axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ScalePlan:
    """Pad/Slice: amounts on tensor axis i are multiplied by ``scale[i]``."""

    scale: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FlattenPlan:
    """Flatten-like node folding spatial axes.

    ``pending``: the dense model keeps the unflattened tensor for a following Gemm/MatMul.
    Otherwise: Transpose by ``perm`` (spatial axes right after batch) and, when several
    feature axes remain, merge them into one.
    """

    pending: bool
    perm: tuple[int, ...] = ()
    merge_features: bool = False


@dataclasses.dataclass(frozen=True)
class HeadConvPlan:
    """Gemm/MatMul on a flattened feature map -> Conv with the map's original size as kernel."""

    unflat_shape: tuple[int, ...]  # static shape of the tensor before Flatten
    spatial_axes: tuple[int, ...]
    feature_axis: int
    est: tuple[int, ...]
    to_channels_last: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class VectorPlan:
    """Node on an 'inserted' (head) tensor: spatial axes sit after the batch axis."""

    kind: str  # "gemm" (to MatMul), "axis" (remap attribute), "identity"
    n_spatial: int
    axis: int | None = None


@dataclasses.dataclass(frozen=True)
class ReshapePlan:
    """Reshape that keeps the spatial block intact: rebuild its target shape at run time.

    Target = [batch of the input if ``batch_from_input``] + ``prefix`` + the input's spatial
    dims + ``suffix``, so the dense model reshapes correctly at any image size.
    """

    in_spatial: tuple[int, int]  # [begin, end) of the block of spatial axes in the input
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    batch_from_input: bool


@dataclasses.dataclass
class OutputInfo:
    name: str
    grid: Grid | None
    shape: ir.Shape | None = None  # the original output's shape at the static size


@dataclasses.dataclass
class Analysis:
    target: tuple[int, ...] | None
    outputs: list[OutputInfo]
    input_axes: dict[str, tuple[int, ...]]
    context_globals: set[str]


# ----------------------------------------------------------------------------- op tables

UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu",
    "Mish", "Softplus", "Softsign", "Clip", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "Cast", "CastLike", "Identity", "Dropout",
    "ThresholdedRelu", "Shrink", "IsNaN", "IsInf", "Swish", "Relu6",
}
BROADCAST = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "PRelu", "Mod", "BitShift", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor", "QuantizeLinear", "DequantizeLinear",
}
CHANNEL_GLOBAL = {"InstanceNormalization", "MeanVarianceNormalization", "GroupNormalization"}
UPSAMPLING = {"Resize", "Upsample", "DepthToSpace"}
REDUCE = {
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
}
SHAPE_OF = {"Shape", "Size"}


class AnalyseGrid(ir.passes.InPlacePass):
    """Compute grids and plans for the requested output stride (None: keep every stride)."""

    def __init__(
        self, output_stride: int | Sequence[int] | None, strategy: str = "dilate", per_phase_global: bool = False
    ) -> None:
        super().__init__()
        self.output_stride = output_stride
        self.strategy = strategy  # "fragments": the graph runs per phase (passes/fragments.py)
        self.per_phase_global = per_phase_global  # dilate: SE context as per-phase means (passes/phase_global.py)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        analyser = _Analyser(model, self.output_stride)
        analyser.fragments = self.strategy == "fragments"
        analyser.per_phase_global = self.per_phase_global
        model.meta[ANALYSIS] = analyser.run()
        return ir.passes.PassResult(model, False)


class _Analyser:
    # Under the "fragments" strategy every phase runs the original ops unchanged, so global
    # context, upsampling and whole-image normalisation stay exact; see passes/fragments.py.
    fragments = False
    per_phase_global = False

    def __init__(self, model: ir.Model, output_stride) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = _ir.opset(model)
        self.output_stride = output_stride
        self.input_axes: dict[str, tuple[int, ...]] = {}
        self.context_globals: set[str] = set()
        self.global_nodes: dict[str, ir.Node] = {}
        self.rules: dict[str, Callable[[ir.Node, list[Grid | None]], list[Grid | None]]] = {}
        for op in _ir.SPATIAL_OPS:
            self.rules[op] = self.spatial
        for op in _ir.GLOBAL_OPS:
            self.rules[op] = self.global_pool
        for op in UNARY:
            self.rules[op] = self.unary
        for op in BROADCAST:
            self.rules[op] = self.broadcast
        for op in REDUCE:
            self.rules[op] = self.reduce
        for op in UPSAMPLING:
            self.rules[op] = self.upsample
        for op in CHANNEL_GLOBAL:
            self.rules[op] = self.channel_global
        self.rules.update(
            BatchNormalization=self.batchnorm,
            LRN=self.channel_op,
            Softmax=self.softmax,
            LogSoftmax=self.softmax,
            Hardmax=self.softmax,
            LayerNormalization=self.layernorm,
            LpNormalization=self.axis_op,
            Concat=self.concat,
            Split=self.axis_op,
            Gather=self.axis_op,
            ArgMax=self.arg_reduce,
            ArgMin=self.arg_reduce,
            Transpose=self.transpose,
            Flatten=self.flatten,
            Reshape=self.reshape,
            Squeeze=self.squeeze,
            Unsqueeze=self.unsqueeze,
            Gemm=self.matmul,
            MatMul=self.matmul,
            Pad=self.pad,
            Slice=self.slice,
            SpaceToDepth=self.space_to_depth,
        )

    # ------------------------------------------------------------------ driver

    def run(self) -> Analysis:
        for node in self.graph:
            node.meta.pop(PLAN, None)
            for out in node.outputs:
                out.meta.pop(GRID, None)
                out.meta.pop(DENSE_SHAPE, None)
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise DenseError(
                f"model uses ONNX opset {self.opset}; onnx-dense handles opsets {MIN_OPSET} to {MAX_OPSET}: "
                "re-export the model with an opset in that range"
            )
        for value in self.graph.inputs:
            if value.name in self.graph.initializers or value.shape is None:
                continue
            value.meta[GRID] = trivial_grid(value.name, value.shape.rank())
        for node in self.graph:
            self.visit(node)
        outputs = [self.check_output(v) for v in self.graph.outputs]
        self.check_globals()
        self.check_assumed_dims()
        return Analysis(self.target_or_none(), outputs, dict(self.input_axes), set(self.context_globals))

    def visit(self, node: ir.Node) -> None:
        grids = [self.grid(v) for v in node.inputs]
        # Upsampling a dense tensor to a size read from a dense shape: its rule says why not.
        dense_upsampling = node.op_type in UPSAMPLING and bool(grids) and grids[0] is not None and grids[0].is_dense
        for i, v in enumerate(node.inputs):
            if v is not None and v.meta.get(DENSE_SHAPE) and any(g is not None for g in grids):
                if not (node.op_type in ("Reshape", "Expand") and i == 1) and not dense_upsampling:
                    raise UnsupportedNodeError(
                        node, f"input '{v.name}' is computed from the shape of a dense tensor, which differs from the original's"
                    )
        if all(g is None for g in grids):
            if any(v is not None and v.meta.get(DENSE_SHAPE) for v in node.inputs):
                for out in node.outputs:
                    out.meta[DENSE_SHAPE] = True
            return
        if node.op_type in SHAPE_OF:
            g = next(g for g in grids if g is not None)
            if g.is_dense and not self.fragments:  # fragments: every phase has the original's shape
                node.outputs[0].meta[DENSE_SHAPE] = True
            return
        if node.domain not in ("", "ai.onnx"):
            rule = None
        else:
            rule = self.rules.get(node.op_type)
        if rule is None:
            raise UnsupportedNodeError(
                node,
                f"op {node.domain + '.' if node.domain else ''}{node.op_type} on an image tensor is not known to "
                "onnx-dense, which cannot tell how it moves pixels",
            )
        results = rule(node, grids)
        for out, g in zip(node.outputs, results):
            if g is not None:
                out.meta[GRID] = g

    def grid(self, value: ir.Value | None) -> Grid | None:
        if value is None:
            return None
        return value.meta.get(GRID)

    # ------------------------------------------------------------------ target

    def target_for(self, n: int, node: ir.Node) -> tuple[int, ...] | None:
        r = self.output_stride
        if r is None:
            return None
        if isinstance(r, int):
            return (r,) * n
        r = tuple(r)
        if len(r) == 1:
            return r * n
        if len(r) != n:
            raise DenseError(
                f"--output-stride has {len(r)} values but node {node_label(node)} works on {n} spatial axes; "
                f"give one value or {n}"
            )
        return r

    def target_or_none(self):
        r = self.output_stride
        if r is None:
            return None
        return (r,) if isinstance(r, int) else tuple(r)

    # ------------------------------------------------------------------ helpers

    def establish(self, node: ir.Node, g: Grid, value: ir.Value, n: int) -> Grid:
        """Give a trivial grid its layout: the last ``n`` axes of ``value`` are spatial."""
        if g.axes is not None:
            if g.rank != n:
                raise UnsupportedNodeError(node, f"expects {n} spatial axes but its input has {g.rank}", "fix the model")
            return g
        dims = _ir.require_static(value, "input", node)
        rank = len(dims)
        axes = tuple(range(rank - n, rank))
        source_axes = tuple(g.perm[a] for a in axes) if g.perm is not None else None
        if source_axes is not None:
            known = self.input_axes.get(g.source)
            if known is not None and known != source_axes:
                raise UnsupportedNodeError(
                    node, f"reads input '{g.source}' with spatial axes {source_axes} but another node uses {known}",
                    "fix the model",
                )
            self.input_axes[g.source] = source_axes
        size = tuple(int(dims[a]) for a in axes)
        rf_start = (0,) * n
        if g.origin is not None and source_axes is not None:
            rf_start = tuple(g.origin[a] for a in source_axes)
        return Grid(
            axes=axes, stride=(1,) * n, est=(1,) * n, size=size, dense_size=size, rf_size=(1,) * n,
            rf_start=rf_start, source=g.source, source_axes=source_axes,
        )

    def shift_origin(self, g: Grid, begin: dict[int, int]) -> Grid:
        """A zero Pad of a tensor whose layout is not known yet (Keras' ZeroPadding2D before the
        first Conv): the receptive field starts ``begin`` pixels before the input. A crop of
        the raw input keeps measuring from the crop, whose edge is where padding begins."""
        if g.perm is None or not any(b > 0 for b in begin.values()):
            return g
        origin = list(g.origin if g.origin is not None else (0,) * len(g.perm))
        for a, b in begin.items():
            origin[g.perm[a]] -= max(b, 0)
        return g.replace(origin=tuple(origin))

    def out_size(self, node: ir.Node, g: Grid, index: int = 0) -> tuple[int, ...]:
        dims = _ir.require_static(node.outputs[index], "output", node)
        return tuple(int(dims[a]) for a in g.axes)

    def check_plain(self, node: ir.Node, g: Grid, what: str = "this op") -> None:
        if g.flattened:
            raise UnsupportedNodeError(
                node, f"{what} reads a flattened feature map that is larger than 1x1 in the original; only "
                "Gemm/MatMul (a fully connected layer) can follow such a Flatten",
            )

    def check_no_spatial(self, node: ir.Node, g: Grid, axes: Sequence[int], what: str) -> None:
        if g.axes is None:  # layout not known yet: nothing upstream strides or convolves
            return
        if set(axes) & set(g.axes):
            if g.is_trivial:
                return
            raise UnsupportedNodeError(
                node, f"{what} runs over a spatial axis (axes {sorted(axes)}, spatial {list(g.axes)}) at eST {fmt(g.est)}",
            )

    def agree(self, node: ir.Node, grids: list[Grid]) -> Grid:
        """Merge the grids of several operands of one pointwise node."""
        first = grids[0]
        if len(grids) == 1:
            return first
        known = [g for g in grids if g.axes is not None]
        if not known:
            return first
        for g in grids:
            if g.axes is None and not all(k.is_trivial or _aligned_with_raw(g, k) for k in known):
                raise UnsupportedNodeError(
                    node, "combines the raw input with a strided tensor or one in another layout; their positions "
                    "do not line up",
                )
        known_sorted = sorted(known, key=lambda g: -math.prod(g.size) if g.size else 0)
        ref = known_sorted[0]
        for g in known:
            if g.flattened != ref.flattened or g.inserted != ref.inserted:
                raise UnsupportedNodeError(node, "combines a flattened head tensor with a spatial one")
            if g.axes != ref.axes and not (ref.inserted and g.inserted):
                raise UnsupportedNodeError(
                    node, f"operands disagree on which axes are spatial ({list(ref.axes)} vs {list(g.axes)})",
                )
            if g.stride != ref.stride or g.est != ref.est:
                raise UnsupportedNodeError(
                    node,
                    f"operands disagree on stride/eST (stride {fmt(ref.stride)} eST {fmt(ref.est)} vs stride "
                    f"{fmt(g.stride)} eST {fmt(g.est)}); choose an output stride that every branch reaches",
                )
        sizes = {g.size for g in known}
        global_from: tuple[str, ...] = ()
        if len(sizes) > 1:
            for g in known:
                if g.size == ref.size:
                    continue
                if g.global_from and all(s == 1 for s in g.size):
                    if (g.is_dense or ref.is_dense) and not (self.fragments or self.per_phase_global):
                        names = ", ".join(f"'{n}'" for n in g.global_from)
                        raise UnsupportedNodeError(
                            node,
                            f"global context from {names} is broadcast back onto the feature map at eST {fmt(ref.est)} "
                            "(a squeeze-and-excitation block); a dilated network averages windows, not the whole "
                            "image, so this is not equivalent",
                            "rewrite with --strategy fragments (or --per-phase-global to keep one dilated graph), "
                            "cut before it with --outputs, or choose an output stride that keeps this block at eST 1",
                        )
                    self.context_globals.update(g.global_from)
                    continue
                raise UnsupportedNodeError(
                    node, f"operands have different spatial sizes ({fmt(ref.size)} vs {fmt(g.size)})", "fix the model"
                )
        else:
            global_from = tuple(sorted({n for g in known for n in g.global_from}))
            dense_sizes = {g.dense_size for g in known if not g.inserted}
            if len(dense_sizes) > 1 and not self.fragments:
                # Equal in the original, not in the dense model: a shorter kernel or a ceil_mode
                # window on one side ends its dense map earlier (ResNet-D's average-pool shortcut).
                node.meta[PLAN] = JoinPlan(ref.axes)
                ref = ref.replace(dense_size=tuple(min(d[k] for d in dense_sizes) for k in range(ref.rank)))
        rf_size, rf_start = merge_rf(known)
        return ref.replace(rf_size=rf_size, rf_start=rf_start, global_from=global_from)

    def check_constant_operand(self, node: ir.Node, value: ir.Value, g: Grid, rank: int) -> None:
        """A grid-free operand of a broadcast op must not vary over space once the net is dense."""
        if g.axes is None or value.shape is None or not g.is_dense or g.inserted:
            return
        dims = list(value.shape.dims)
        offset = rank - len(dims)
        for a in g.axes:
            i = a - offset
            if 0 <= i < len(dims) and dims[i] != 1:
                raise UnsupportedNodeError(
                    node,
                    f"operand '{value.name}' varies over spatial axis {a} (a fixed-size map such as a positional "
                    "encoding), which has no dense equivalent",
                )

    # ------------------------------------------------------------------ rules

    def spatial(self, node: ir.Node, grids):
        x = node.inputs[0]
        g = grids[0]
        if g is None or any(gr is not None for gr in grids[1:]):
            raise UnsupportedNodeError(node, "weights computed from the image are not supported", "fix the model")
        self.check_plain(node, g)
        if g.inserted:
            raise UnsupportedNodeError(node, "spatial op after a flattening head", "fix the model")
        params = _ir.window_params(node)
        n = len(params.kernel)
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", ""):
            raise UnsupportedNodeError(node, "auto_pad left after normalisation", "report this as a bug")
        if g.axes is not None and g.rank < n:
            return self.window_beyond_grid(node, g, params)
        g = self.establish(node, g, x, n)
        if node.op_type == "ConvTranspose":
            return [self.conv_transpose(node, g, params)]
        if node.op_type == "LpPool" and self.opset < 18 and g.is_dense:
            raise UnsupportedNodeError(node, "LpPool has no dilations before opset 18", "re-export with opset >= 18")
        if node.op_type == "MaxPool" and len(node.outputs) > 1 and _used(node.outputs[1]) and g.is_dense:
            raise UnsupportedNodeError(node, "MaxPool indices of a dense pool index a different tensor")
        target = self.target_for(n, node)
        if target is None:
            kept = params.strides
        else:
            kept = tuple(
                split_stride(s, d, r, e) for s, d, r, e in zip(params.strides, g.dense_stride, target, g.est)
            )
        node.meta[PLAN] = SpatialPlan(params, g.est, kept)
        out = self.window_grid(node, g, params, kept)
        results = [out]
        if len(node.outputs) > 1:
            results.append(None)
        return results

    def window_grid(self, node: ir.Node, g: Grid, params: _ir.WindowParams, kept: tuple[int, ...]) -> Grid:
        """The grid after a window whose axes are exactly the grid's (``params`` in grid order)."""
        est = tuple(e * s // k for e, s, k in zip(g.est, params.strides, kept))
        stride = tuple(S * s for S, s in zip(g.stride, params.strides))
        rf_size = tuple(r + (ek - 1) * S for r, ek, S in zip(g.rf_size, params.effective_kernel, g.stride))
        rf_start = tuple(st - pb * S for st, pb, S in zip(g.rf_start, params.pads_begin, g.stride))
        dense_size = tuple(
            (L + e * (pb + pe) - e * (ek - 1) - 1) // k + 1
            for L, e, pb, pe, ek, k in zip(
                g.dense_size, g.est, params.pads_begin, params.pads_end, params.effective_kernel, kept
            )
        )
        size = self.out_size(node, g)
        # A window over a 1x1 map of global context (the 1x1 Convs of a squeeze-and-excitation
        # block) still carries nothing but that context.
        still_global = g.global_from if all(s == 1 for s in g.size + size) else ()
        return g.replace(
            stride=stride, est=est, size=size, dense_size=dense_size, rf_size=rf_size,
            rf_start=rf_start, global_from=still_global,
        )

    def window_beyond_grid(self, node: ir.Node, g: Grid, params: _ir.WindowParams):
        """A window over more axes than the image has, e.g. torch's LocalResponseNorm: an
        AveragePool3d over (channel, H, W) with kernel (size, 1, 1). Axes that are not image
        axes keep their window as it is; the image axes follow the usual rule."""
        if node.op_type not in ("MaxPool", "AveragePool", "LpPool", "Conv"):
            raise UnsupportedNodeError(node, f"works on {len(params.kernel)} axes but the image has {g.rank}")
        rank = self.rank_of(node, node.inputs[0])
        n = len(params.kernel)
        window_axes = tuple(range(rank - n, rank))
        if not set(g.axes) <= set(window_axes):
            raise UnsupportedNodeError(
                node, f"its window axes {list(window_axes)} do not cover the image axes {list(g.axes)}", "fix the model"
            )
        sel = [window_axes.index(a) for a in g.axes]

        def pick(values):
            return tuple(values[i] for i in sel)

        def spread(values, fill):
            out = list(fill)
            for i, v in zip(sel, values):
                out[i] = v
            return tuple(out)

        sub = _ir.WindowParams(
            pick(params.kernel), pick(params.strides), pick(params.dilations), pick(params.pads_begin),
            pick(params.pads_end),
        )
        target = self.target_for(g.rank, node)
        kept = sub.strides if target is None else tuple(
            split_stride(s, d, r, e) for s, d, r, e in zip(sub.strides, g.dense_stride, target, g.est)
        )
        if node.op_type == "LpPool" and self.opset < 18 and g.is_dense:
            raise UnsupportedNodeError(node, "LpPool has no dilations before opset 18", "re-export with opset >= 18")
        node.meta[PLAN] = SpatialPlan(params, spread(g.est, (1,) * n), spread(kept, params.strides))
        results = [self.window_grid(node, g, sub, kept)]
        return results + [None] * (len(node.outputs) - 1)

    def conv_transpose(self, node: ir.Node, g: Grid, params: _ir.WindowParams) -> Grid:
        if any(s > 1 for s in params.strides):
            return self.upsample(node, [g])[0]
        if g.is_dense and (node.attributes.get_ints("output_padding") or node.attributes.get_ints("output_shape")):
            raise UnsupportedNodeError(node, "ConvTranspose with output_padding/output_shape in the dense region")
        node.meta[PLAN] = SpatialPlan(params, g.est, params.strides)
        ek = params.effective_kernel
        rf_size = tuple(r + (k - 1) * S for r, k, S in zip(g.rf_size, ek, g.stride))
        rf_start = tuple(st - (k - 1 - pb) * S for st, k, pb, S in zip(g.rf_start, ek, params.pads_begin, g.stride))
        dense_size = tuple(
            L + e * (k - 1) - e * (pb + pe)
            for L, e, k, pb, pe in zip(g.dense_size, g.est, ek, params.pads_begin, params.pads_end)
        )
        return g.replace(size=self.out_size(node, g), dense_size=dense_size, rf_size=rf_size, rf_start=rf_start)

    def upsample(self, node: ir.Node, grids):
        g = next(gr for gr in grids if gr is not None)
        if g.axes is None:
            raise UnsupportedNodeError(node, "upsampling the raw input is not supported", "fix the model")
        self.check_plain(node, g)
        if node.op_type in ("Resize", "Upsample") and g.global_from and all(s == 1 for s in g.size):
            return [self.broadcast_context(node, g)]
        if g.is_dense and not self.fragments:
            raise UnsupportedNodeError(
                node,
                f"upsamples at eST {fmt(g.est)}: two dense phases would claim the same output position, so there is no "
                "single-tensor dense equivalent",
                "rewrite with --strategy fragments, cut before it with --outputs, or choose an output stride at which "
                "it stays at eST 1",
            )
        if node.op_type == "DepthToSpace":
            block = node.attributes.get_int("blocksize", 1)
            size = tuple(s * block for s in g.size)
        else:
            size = self.out_size(node, g)
        stride = []
        for S, a, b in zip(g.stride, g.size, size):
            if b % a or S % (b // a):
                raise UnsupportedNodeError(
                    node, f"scales {fmt(g.size)} to {fmt(size)}, not an integer factor of the stride {fmt(g.stride)}",
                    "fix the model",
                )
            stride.append(S // (b // a))
        # Interpolation and transposed kernels read neighbours: widen the field by one input step
        # each side (conservative: margins built from it stay exact).
        rf_size = tuple(r + 2 * S for r, S in zip(g.rf_size, g.stride))
        rf_start = tuple(st - S for st, S in zip(g.rf_start, g.stride))
        est = g.est
        if g.is_dense:  # fragments: phases whose shift is now a whole step coincide (passes/fragments.py)
            est = _upsampled_est(node, g.est, tuple(S // s for S, s in zip(g.stride, stride)))
        return [
            g.replace(
                stride=tuple(stride), est=est, size=size, dense_size=tuple(s * e for s, e in zip(size, est)),
                rf_size=rf_size, rf_start=rf_start,
            )
        ]

    def broadcast_context(self, node: ir.Node, g: Grid) -> Grid:
        """Resize of a 1x1 map of global context back to a feature map's size (DeepLab's image
        pooling branch): a broadcast, exact where eST = 1, global context mixed into the map else."""
        if g.is_dense and not self.fragments:
            names = ", ".join(f"'{n}'" for n in g.global_from)
            raise UnsupportedNodeError(
                node,
                f"global context from {names} is resized back onto the feature map at eST {fmt(g.est)} (an image "
                "pooling branch); a dilated network averages windows, not the whole image, so this is not equivalent",
                "rewrite with --strategy fragments, cut before it with --outputs, or choose an output stride that "
                "keeps this block at eST 1",
            )
        self.context_globals.update(g.global_from)
        size = self.out_size(node, g)
        return g.replace(size=size, dense_size=size)

    def space_to_depth(self, node: ir.Node, grids):
        g = grids[0]
        if g.axes is None:
            g = self.establish(node, g, node.inputs[0], g.perm and len(g.perm) - 2 or 2)
        block = node.attributes.get_int("blocksize", 1)
        target = self.target_for(g.rank, node)
        if g.is_dense or (
            target is not None
            and any(split_stride(block, d, r, e) != block for d, r, e in zip(g.dense_stride, target, g.est))
        ):
            raise UnsupportedNodeError(
                node, "SpaceToDepth is a strided op that cannot be made dense", "choose an output stride it keeps"
            )
        size = tuple(s // block for s in g.size)
        rf_size = tuple(r + (block - 1) * S for r, S in zip(g.rf_size, g.stride))
        return [
            g.replace(
                stride=tuple(S * block for S in g.stride), size=size, dense_size=size, rf_size=rf_size, global_from=()
            )
        ]

    def unary(self, node: ir.Node, grids):
        g = grids[0]
        if g is None or any(gr is not None for gr in grids[1:]):
            raise UnsupportedNodeError(node, "image-dependent parameters are not supported", "fix the model")
        results: list[Grid | None] = [g]
        results += [g if node.op_type != "Dropout" else None for _ in node.outputs[1:]]
        return results

    def broadcast(self, node: ir.Node, grids):
        gridded = [g for g in grids if g is not None]
        g = self.agree(node, gridded)
        rank = max((v.shape.rank() for v in node.inputs if v is not None and v.shape is not None), default=0)
        for v, gr in zip(node.inputs, grids):
            if gr is None and v is not None:
                self.check_constant_operand(node, v, g, rank)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and g.axes is not None:
            axis = _ir.normalise_axis(node.attributes.get_int("axis", 1), rank)
            if node.inputs[1] is not None and node.inputs[1].shape is not None and node.inputs[1].shape.rank() == 1:
                self.check_no_spatial(node, g, [axis], "per-axis quantisation")
        return [g for _ in node.outputs]

    def batchnorm(self, node: ir.Node, grids):
        g = grids[0]
        if any(gr is not None for gr in grids[1:]):
            raise UnsupportedNodeError(node, "image-dependent BatchNormalization parameters", "fix the model")
        if node.attributes.get_int("training_mode", 0):
            raise UnsupportedNodeError(node, "BatchNormalization in training mode", "export the model in eval mode")
        self.check_plain(node, g)
        if g.inserted:
            raise UnsupportedNodeError(node, "BatchNormalization on a head vector (BatchNorm1d after Flatten)")
        self.check_no_spatial(node, g, [1], "BatchNormalization's channel axis")
        return [g] + [None] * (len(node.outputs) - 1)

    def channel_op(self, node: ir.Node, grids):
        g = grids[0]
        self.check_plain(node, g)
        if g.inserted:
            raise UnsupportedNodeError(node, f"{node.op_type} on a head vector")
        self.check_no_spatial(node, g, [1], f"{node.op_type}'s channel axis")
        return [g]

    def channel_global(self, node: ir.Node, grids):
        g = grids[0]
        self.check_plain(node, g)
        if g.is_dense and not self.fragments:
            raise UnsupportedNodeError(
                node, f"normalises over the whole image at eST {fmt(g.est)}; a dense tensor mixes phases",
                "rewrite with --strategy fragments, cut before it with --outputs, or choose an output stride that "
                "keeps it at eST 1",
            )
        return [g] + [None] * (len(node.outputs) - 1)

    def rank_of(self, node: ir.Node, value: ir.Value) -> int:
        if value.shape is None:
            raise DenseError(f"node {node_label(node)}: rank of '{value.name}' unknown; give --input-shape")
        return value.shape.rank()

    def softmax(self, node: ir.Node, grids):
        g = grids[0]
        self.check_plain(node, g)
        rank = self.rank_of(node, node.inputs[0])
        default = -1 if self.opset >= 13 else 1
        axis = _ir.normalise_axis(node.attributes.get_int("axis", default), rank)
        if g.inserted:
            if axis == 0:
                raise UnsupportedNodeError(node, "softmax over the batch axis")
            node.meta[PLAN] = VectorPlan("axis", g.rank, axis + g.rank)
            return [g]
        axes = list(range(axis, rank)) if self.opset < 13 else [axis]
        self.check_no_spatial(node, g, axes, f"{node.op_type}")
        return [g]

    def layernorm(self, node: ir.Node, grids):
        g = grids[0]
        self.check_plain(node, g)
        rank = self.rank_of(node, node.inputs[0])
        axis = _ir.normalise_axis(node.attributes.get_int("axis", -1), rank)
        if g.inserted:
            raise UnsupportedNodeError(node, "LayerNormalization on a head vector")
        self.check_no_spatial(node, g, range(axis, rank), "LayerNormalization")
        return [g] + [None] * (len(node.outputs) - 1)

    def axis_op(self, node: ir.Node, grids):
        g = grids[0]
        if g is None or any(gr is not None for gr in grids[1:]):
            raise UnsupportedNodeError(node, "image-dependent indices or split sizes", "fix the model")
        self.check_plain(node, g)
        rank = self.rank_of(node, node.inputs[0])
        default = 0 if node.op_type in ("Split", "Gather") else -1
        axis = _ir.normalise_axis(node.attributes.get_int("axis", default), rank)
        if g.inserted:
            if axis == 0:
                raise UnsupportedNodeError(node, f"{node.op_type} over the batch axis of a head vector")
            node.meta[PLAN] = VectorPlan("axis", g.rank, axis + g.rank)
            if node.op_type == "Gather":
                idx = node.inputs[1]
                if idx is None or idx.shape is None or idx.shape.rank() != 0:
                    raise UnsupportedNodeError(node, "Gather with non-scalar indices on a head vector")
            return [g for _ in node.outputs]
        self.check_no_spatial(node, g, [axis], node.op_type)
        if node.op_type == "Gather" and g.axes is not None:
            idx_rank = node.inputs[1].shape.rank() if node.inputs[1] is not None and node.inputs[1].shape is not None else None
            if idx_rank is None:
                raise UnsupportedNodeError(node, "Gather indices of unknown rank", "fix the model")
            g = g.replace(axes=tuple(a if a < axis else a + idx_rank - 1 for a in g.axes))
        return [g for _ in node.outputs]

    def concat(self, node: ir.Node, grids):
        gridded = [g for g in grids if g is not None]
        g = self.agree(node, gridded)
        rank = self.rank_of(node, node.outputs[0]) if node.outputs[0].shape is not None else None
        axis = node.attributes.get_int("axis", 0)
        if rank is not None:
            axis = _ir.normalise_axis(axis, rank)
        if any(gr is None for gr in grids) and g.is_dense:
            raise UnsupportedNodeError(node, "concatenates an image tensor with a constant one", "fix the model")
        if g.inserted:
            node.meta[PLAN] = VectorPlan("axis", g.rank, axis + g.rank)
            return [g]
        self.check_plain(node, g)
        self.check_no_spatial(node, g, [axis], "Concat")
        return [g]

    def reduce_axes(self, node: ir.Node, rank: int) -> list[int] | None:
        axes = node.attributes.get_ints("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            arr = _ir.const_array(node.inputs[1])
            if arr is None:
                raise UnsupportedNodeError(node, "reduction axes computed at run time", "fix the model")
            axes = arr.reshape(-1).tolist()
        if axes is None or len(axes) == 0:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                return []
            return list(range(rank))
        return sorted(_ir.normalise_axis(int(a), rank) for a in axes)

    def reduce(self, node: ir.Node, grids):
        g = grids[0]
        if any(gr is not None for gr in grids[1:]):
            raise UnsupportedNodeError(node, "image-dependent reduction axes", "fix the model")
        self.check_plain(node, g)
        rank = self.rank_of(node, node.inputs[0])
        axes = self.reduce_axes(node, rank)
        keepdims = bool(node.attributes.get_int("keepdims", 1))
        if g.inserted:
            if 0 in axes:
                raise UnsupportedNodeError(node, "reduction over the batch axis of a head vector")
            node.meta[PLAN] = VectorPlan("axes", g.rank)
            return [g]
        if g.axes is None:
            return [g] if keepdims or not axes else [None]
        spatial = set(g.axes)
        touched = spatial & set(axes)
        if not touched:
            if not keepdims:
                g = g.replace(axes=tuple(a - sum(1 for r in axes if r < a) for a in g.axes))
            return [g]
        if touched != spatial:
            raise UnsupportedNodeError(node, f"reduces over some spatial axes ({sorted(touched)}) but not all of them")
        if set(axes) != spatial:
            raise UnsupportedNodeError(node, "reduces over spatial and channel axes together")
        kind = {"ReduceMean": "avg", "ReduceMax": "max"}.get(node.op_type)
        return [self.globalise(node, g, kind, keepdims)]

    def global_pool(self, node: ir.Node, grids):
        g = grids[0]
        self.check_plain(node, g)
        if g.inserted:
            raise UnsupportedNodeError(node, "global pooling of a head vector", "fix the model")
        if g.axes is None:
            n = self.rank_of(node, node.inputs[0]) - 2
            g = self.establish(node, g, node.inputs[0], n)
        kind = {"GlobalAveragePool": "avg", "GlobalMaxPool": "max"}.get(node.op_type)
        return [self.globalise(node, g, kind, True)]

    def globalise(self, node: ir.Node, g: Grid, kind: str | None, keepdims: bool) -> Grid:
        """Common part of global pooling: a window covering the whole original map."""
        self.global_nodes[node.name] = node
        perm = None
        rank = self.rank_of(node, node.inputs[0])
        n = g.rank
        if not keepdims:
            others = [a for a in range(1, rank) if a not in g.axes]
            perm = (0, *g.axes, *others)
        node.meta[PLAN] = GlobalPlan(kind or "", g.size, g.est, g.axes, keepdims, perm)
        rf_size = tuple(r + (s - 1) * S for r, s, S in zip(g.rf_size, g.size, g.stride))
        dense_size = tuple(L - e * (s - 1) for L, e, s in zip(g.dense_size, g.est, g.size))
        out = g.replace(size=(1,) * n, dense_size=dense_size, rf_size=rf_size, global_from=(node.name,))
        if not keepdims:
            out = out.replace(axes=tuple(range(1, n + 1)), inserted=True)
        return out

    def check_assumed_dims(self) -> None:
        """Branches chosen at normalisation from static dims must not depend on a dense size."""
        if self.fragments:  # every phase keeps the original's sizes
            return
        for value, dims, label in self.model.meta.get(ASSUMED_DIMS, []):
            g = self.grid(value)
            if g is None or g.axes is None or not g.is_dense:
                continue
            spatial = sorted(set(dims) & set(g.axes))
            if spatial:
                raise DenseError(
                    f"node {label}: its branch was chosen from the size of spatial axis {spatial[0]} of '{value.name}', "
                    f"which the dense model changes (eST {fmt(g.est)}); cut the graph before it with --outputs, "
                    "or choose an output stride that keeps it at eST 1"
                )

    def check_globals(self) -> None:
        for name, node in self.global_nodes.items():
            plan = node.meta.get(PLAN)
            if name in self.context_globals:
                node.meta.pop(PLAN, None)
                continue
            if isinstance(plan, GlobalPlan) and not plan.kind and not self.fragments:
                raise UnsupportedNodeError(
                    node, f"{node.op_type} over the whole image has no windowed equivalent in onnx-dense",
                    "cut before it with --outputs",
                )
        if self.context_globals:
            self.keep_context_vectors()

    def keep_context_vectors(self) -> None:
        """A global op kept as it is (context at eST 1) still yields the original's vector, not
        a dense head vector: the nodes planned for one downstream of it stay as they are (the
        Gemm/MatMul, Reshape((1, 1, C)) or Unsqueeze of an SE block built from a keepdims=0 mean)."""
        for node, plan in _ir.planned(self.graph, VectorPlan, FlattenPlan):
            if not node.inputs:
                continue
            g = self.grid(node.inputs[0])
            if g is not None and g.inserted and not g.is_dense and set(g.global_from) & self.context_globals:
                node.meta.pop(PLAN)

    def arg_reduce(self, node: ir.Node, grids):
        g = grids[0]
        self.check_plain(node, g)
        rank = self.rank_of(node, node.inputs[0])
        axis = _ir.normalise_axis(node.attributes.get_int("axis", 0), rank)
        keepdims = bool(node.attributes.get_int("keepdims", 1))
        if g.inserted:
            if axis == 0 or not keepdims and axis != rank - 1:
                raise UnsupportedNodeError(node, f"{node.op_type} on a head vector")
            node.meta[PLAN] = VectorPlan("axis", g.rank, axis + g.rank)
            return [g]
        self.check_no_spatial(node, g, [axis], node.op_type)
        if not keepdims and g.axes is not None:
            g = g.replace(axes=tuple(a - (a > axis) for a in g.axes))
        return [g]

    def transpose(self, node: ir.Node, grids):
        g = grids[0]
        rank = self.rank_of(node, node.inputs[0])
        perm = tuple(node.attributes.get_ints("perm", tuple(reversed(range(rank)))))
        if g.axes is None:
            return [g.replace(perm=tuple(g.perm[p] for p in perm) if g.perm is not None else None)]
        self.check_plain(node, g, "Transpose")
        if g.inserted:
            if perm[0] != 0 or tuple(perm) != tuple(range(rank)):
                raise UnsupportedNodeError(node, "transposes a head vector")
            return [g]
        return [g.replace(axes=tuple(perm.index(a) for a in g.axes))]

    def flatten(self, node: ir.Node, grids):
        g = grids[0]
        rank = self.rank_of(node, node.inputs[0])
        axis = _ir.normalise_axis(node.attributes.get_int("axis", 1), rank)
        if g.axes is None:
            return [g.replace(perm=None)]
        if g.inserted:
            if rank == 2 and axis == 1:
                node.meta[PLAN] = VectorPlan("identity", g.rank)
                return [g]
            raise UnsupportedNodeError(node, "flattens a head vector of rank > 2")
        if axis != 1:
            if all(a < axis for a in g.axes) and g.is_trivial:
                return [g.replace(perm=None, axes=None)]
            raise UnsupportedNodeError(node, f"Flatten with axis={axis}: only axis=1 (keep the batch) is supported")
        return [self.fold(node, g, rank)]

    def fold(self, node: ir.Node, g: Grid, rank: int) -> Grid:
        """Flatten-like node that folds every non-batch axis, spatial ones included."""
        self.check_plain(node, g, "a second Flatten")
        others = [a for a in range(1, rank) if a not in g.axes]
        if all(s == 1 for s in g.size):
            perm = (0, *g.axes, *others)
            node.meta[PLAN] = FlattenPlan(False, perm, len(others) != 1)
            return g.replace(axes=tuple(range(1, g.rank + 1)), inserted=True)
        if len(others) != 1:
            raise UnsupportedNodeError(node, "flattens a map with several feature axes into a fully connected layer")
        node.meta[PLAN] = FlattenPlan(True)
        dims = _ir.require_static(node.inputs[0], "input", node)
        return g.replace(flattened=True, unflat_shape=tuple(dims))

    def reshape(self, node: ir.Node, grids):
        g = grids[0]
        if grids[1] is not None:
            raise UnsupportedNodeError(node, "reshapes to an image-dependent shape", "fix the model")
        if g.axes is None:
            return [g.replace(perm=None)]
        in_dims = _ir.static_dims(node.inputs[0])
        out_dims = _ir.static_dims(node.outputs[0])
        if in_dims is None or out_dims is None or any(d is None for d in in_dims[1:] + out_dims[1:]):
            raise DenseError(
                f"node {node_label(node)}: cannot tell what this Reshape does (shapes unknown after inference); "
                "give the input size with --input-shape"
            )
        same_batch = in_dims[0] == out_dims[0] or (in_dims[0] is None and out_dims[0] is None)
        if g.inserted:
            if len(in_dims) == 2 and len(out_dims) == 2 and same_batch:
                node.meta[PLAN] = VectorPlan("identity", g.rank)
                return [g]
            unfolded = self.unfold(node, g, in_dims, out_dims) if same_batch else None
            if unfolded is not None:
                return [unfolded]
            raise UnsupportedNodeError(node, "reshapes a head vector")
        rank = len(in_dims)
        if len(out_dims) == 2 and same_batch and out_dims[1] == math.prod(in_dims[1:]):
            return [self.fold(node, g, rank)]
        plan = _spatial_preserving_reshape(in_dims, out_dims, g.axes)
        if plan is not None:
            node.meta[PLAN] = plan[0]
            return [g.replace(axes=plan[1])]
        raise UnsupportedNodeError(
            node,
            f"Reshape from {_dims(in_dims)} to {_dims(out_dims)} mixes spatial axes with others, which has no "
            "dense equivalent",
        )

    def squeeze(self, node: ir.Node, grids):
        g = grids[0]
        rank = self.rank_of(node, node.inputs[0])
        axes = node.attributes.get_ints("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            arr = _ir.const_array(node.inputs[1])
            if arr is None:
                raise UnsupportedNodeError(node, "squeeze axes computed at run time", "fix the model")
            axes = arr.reshape(-1).tolist()
        dims = _ir.static_dims(node.inputs[0])
        if axes is None:
            axes = [i for i, d in enumerate(dims) if d == 1]
        axes = sorted(_ir.normalise_axis(int(a), rank) for a in axes)
        if g.axes is None:
            return [g.replace(perm=None)]
        if g.inserted:
            raise UnsupportedNodeError(node, "squeezes a head vector")
        touched = set(axes) & set(g.axes)
        if not touched:
            return [g.replace(axes=tuple(a - sum(1 for r in axes if r < a) for a in g.axes))]
        if touched != set(g.axes) or any(s != 1 for s in g.size):
            raise UnsupportedNodeError(node, "squeezes some spatial axes but not all, or axes larger than 1")
        if 0 in axes:
            raise UnsupportedNodeError(node, "squeezes the batch axis")
        others = [a for a in range(1, rank) if a not in g.axes and a not in axes]
        perm = (0, *g.axes, *others)
        node.meta[PLAN] = FlattenPlan(False, perm, len(others) != 1)
        return [g.replace(axes=tuple(range(1, g.rank + 1)), inserted=True)]

    def unsqueeze(self, node: ir.Node, grids):
        g = grids[0]
        axes = node.attributes.get_ints("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            arr = _ir.const_array(node.inputs[1])
            if arr is None:
                raise UnsupportedNodeError(node, "unsqueeze axes computed at run time", "fix the model")
            axes = arr.reshape(-1).tolist()
        out_rank = self.rank_of(node, node.outputs[0])
        axes = sorted(_ir.normalise_axis(int(a), out_rank) for a in axes)
        if g.axes is None:
            return [g.replace(perm=None)]
        if g.inserted:
            unfolded = None
            if 0 not in axes:
                unfolded = self.unfold(node, g, _ir.static_dims(node.inputs[0]), _ir.static_dims(node.outputs[0]))
            if unfolded is not None:
                return [unfolded]
            raise UnsupportedNodeError(node, "unsqueezes a head vector")
        self.check_plain(node, g)
        new_axes = []
        kept = [i for i in range(out_rank) if i not in axes]
        for a in g.axes:
            new_axes.append(kept[a])
        return [g.replace(axes=tuple(new_axes))]

    def unfold(self, node: ir.Node, g: Grid, in_dims, out_dims) -> Grid | None:
        """A head vector (N, C) given its unit spatial axes back, as (N, 1, 1, C) or (N, C, 1, 1):
        Keras' GlobalAveragePooling2D + Reshape((1, 1, C)) (EfficientNet's squeeze-and-excitation,
        DeepLab's image pooling), or Unsqueeze(axes=[2, 3]). The dense tensor, positions after
        the batch axis, is a map again: as it is (channels last) or transposed (channels first)."""
        n = g.rank
        if in_dims is None or out_dims is None or len(in_dims) != 2 or len(out_dims) != 2 + n or in_dims[1] is None:
            return None
        c = in_dims[1]
        if tuple(out_dims[1:]) == (1,) * n + (c,):
            perm, axes = tuple(range(n + 2)), tuple(range(1, n + 1))
        elif tuple(out_dims[1:]) == (c,) + (1,) * n:
            perm, axes = (0, n + 1, *range(1, n + 1)), tuple(range(2, n + 2))
        else:
            return None
        node.meta[PLAN] = FlattenPlan(False, perm, False)
        return g.replace(axes=axes, inserted=False)

    def matmul(self, node: ir.Node, grids):
        a, b = grids[0], grids[1] if len(grids) > 1 else None
        if a is None or b is not None or any(gr is not None for gr in grids[2:]):
            raise UnsupportedNodeError(node, "matrix product with image-dependent weights", "fix the model")
        weight = node.inputs[1]
        if weight.shape is None or weight.shape.rank() != 2:
            raise UnsupportedNodeError(node, "fully connected layer whose weight is not a 2-D tensor")
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            raise UnsupportedNodeError(node, "Gemm with transA=1 on an image tensor")
        if a.flattened:
            n = a.rank
            shape = a.unflat_shape
            feature = next(i for i in range(1, len(shape)) if i not in a.axes)
            perm = (0, *range(2, 2 + n), 1)
            node.meta[PLAN] = HeadConvPlan(shape, a.axes, feature, a.est, perm)
            rf_size = tuple(r + (s - 1) * S for r, s, S in zip(a.rf_size, a.size, a.stride))
            dense_size = tuple(L - e * (s - 1) for L, e, s in zip(a.dense_size, a.est, a.size))
            return [
                a.replace(
                    axes=tuple(range(1, n + 1)), flattened=False, inserted=True, unflat_shape=None,
                    size=(1,) * n, dense_size=dense_size, rf_size=rf_size, global_from=(),
                )
            ]
        if a.inserted:
            node.meta[PLAN] = VectorPlan("gemm" if node.op_type == "Gemm" else "identity", a.rank)
            return [a]
        rank = self.rank_of(node, node.inputs[0])
        if a.axes is not None and rank - 1 in a.axes and not a.is_trivial:
            raise UnsupportedNodeError(node, "matrix product over a spatial axis")
        return [a]

    def pad(self, node: ir.Node, grids):
        g = grids[0]
        if any(gr is not None for gr in grids[1:]):
            raise UnsupportedNodeError(node, "image-dependent pads", "fix the model")
        rank = self.rank_of(node, node.inputs[0])
        if g.axes is not None:
            self.check_plain(node, g)
        if g.inserted:
            raise UnsupportedNodeError(node, "pads a head vector")
        pads = _ir.const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None:
            pads = node.attributes.get_ints("pads")
            if pads is None:
                if g.axes is None:  # the raw input, padded at run time: nothing to scale
                    return [g]
                raise UnsupportedNodeError(node, "pads computed at run time", "fix the model")
        pads = np.asarray(pads).reshape(-1).tolist()
        axes = list(range(rank))
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            arr = _ir.const_array(node.inputs[3])
            if arr is None:
                if g.axes is None:
                    return [g]
                raise UnsupportedNodeError(node, "pad axes computed at run time", "fix the model")
            axes = [_ir.normalise_axis(int(x), rank) for x in arr.reshape(-1)]
        k = len(axes)
        begin = {a: int(pads[i]) for i, a in enumerate(axes)}
        end = {a: int(pads[k + i]) for i, a in enumerate(axes)}
        if g.axes is None:
            return [self.shift_origin(g, begin)]
        mode = node.attributes.get_string("mode", "constant")
        spatial_padded = any(begin.get(a, 0) or end.get(a, 0) for a in g.axes)
        if spatial_padded and g.is_dense and mode != "constant" and not self.fragments:
            raise UnsupportedNodeError(
                node, f"'{mode}' padding at eST {fmt(g.est)} copies dense neighbours, not the original's"
            )
        scale = tuple(g.est[g.axes.index(a)] if a in g.axes else 1 for a in axes)
        if any(s > 1 for s in scale) and spatial_padded:
            node.meta[PLAN] = ScalePlan(scale)
        pb = tuple(begin.get(a, 0) for a in g.axes)
        pe = tuple(end.get(a, 0) for a in g.axes)
        return [
            g.replace(
                size=tuple(s + b + e for s, b, e in zip(g.size, pb, pe)),
                dense_size=tuple(L + e * (b + x) for L, e, b, x in zip(g.dense_size, g.est, pb, pe)),
                rf_start=tuple(st - b * S for st, b, S in zip(g.rf_start, pb, g.stride)),
            )
        ]

    def slice(self, node: ir.Node, grids):
        g = grids[0]
        if any(gr is not None for gr in grids[1:]):
            raise UnsupportedNodeError(node, "image-dependent slice bounds", "fix the model")
        if g.axes is None:
            return [g]
        self.check_plain(node, g)
        rank = self.rank_of(node, node.inputs[0])
        arrays = [_ir.const_array(v) if v is not None else None for v in node.inputs[1:5]]
        if len(node.inputs) < 3 or arrays[0] is None or arrays[1] is None:
            raise UnsupportedNodeError(node, "slice bounds computed at run time (or opset < 10 Slice)", "fix the model")
        starts, ends = arrays[0].reshape(-1).tolist(), arrays[1].reshape(-1).tolist()
        axes = arrays[2].reshape(-1).tolist() if len(arrays) > 2 and arrays[2] is not None else list(range(len(starts)))
        steps = arrays[3].reshape(-1).tolist() if len(arrays) > 3 and arrays[3] is not None else [1] * len(starts)
        axes = [_ir.normalise_axis(int(a), rank) for a in axes]
        if g.inserted:
            if any(a == 0 for a in axes):
                raise UnsupportedNodeError(node, "slices the batch axis of a head vector")
            node.meta[PLAN] = VectorPlan("axes", g.rank)
            return [g]
        dims = _ir.require_static(node.inputs[0], "input", node)
        size, dense_size, rf_start = list(g.size), list(g.dense_size), list(g.rf_start)
        touched = False
        for a, st, en, sp in zip(axes, starts, ends, steps):
            if a not in g.axes:
                continue
            k = g.axes.index(a)
            n_in = int(dims[a])
            st_n, en_n, _ = slice(int(st), int(en), int(sp)).indices(n_in)
            if (st_n, en_n) == (0, n_in) and sp == 1:
                continue
            if sp != 1:
                raise UnsupportedNodeError(node, "strided slicing of a spatial axis")
            touched = True
            e = g.est[k]
            size[k] = max(en_n - st_n, 0)
            rf_start[k] += st_n * g.stride[k]
            dense_end = dense_size[k] if en_n >= n_in else min(e * en_n, dense_size[k])
            dense_size[k] = max(dense_end - e * st_n, 0)
        if touched and g.is_dense:
            node.meta[PLAN] = ScalePlan(tuple(g.est[g.axes.index(a)] if a in g.axes else 1 for a in range(rank)))
        return [g.replace(size=tuple(size), dense_size=tuple(dense_size), rf_start=tuple(rf_start))]

    # ------------------------------------------------------------------ outputs

    def check_output(self, value: ir.Value) -> OutputInfo:
        g = self.grid(value)
        if g is None or g.axes is None:
            return OutputInfo(value.name, None, value.shape)
        if g.flattened:
            producer = value.producer()
            raise UnsupportedNodeError(
                producer, "its output is a flattened feature map larger than 1x1, which has no dense equivalent",
                "end the graph at the fully connected layer that follows it, or before the Flatten",
            )
        target = self.target_or_none()
        if target is not None:
            n = g.rank
            tgt = target * n if len(target) == 1 else target
            for D, S, R in zip(g.dense_stride, g.stride, tgt):
                if D != min(R, S):
                    raise DenseError(
                        f"output '{value.name}': output stride {fmt(tgt)} is not reachable: the original predicts "
                        f"every {fmt(g.stride)} input pixels, and setting layer strides to 1 can only give the stride "
                        f"found at the input of one of its strided layers; "
                        f"reachable output strides: {reachable_text(self.model_strides(value))}"
                    )
        return OutputInfo(value.name, g, value.shape)

    def model_strides(self, value: ir.Value) -> list[int]:
        g = self.grid(value)
        return strides_along(g)


def _upsampled_est(node: ir.Node, est: tuple[int, ...], factor: tuple[int, ...]) -> tuple[int, ...]:
    """eST after upsampling by ``factor`` under fragments: the phases of the last removed
    strides now differ by whole output steps and collapse into one (passes/fragments.py)."""
    out = []
    for e, u in zip(est, factor):
        if e % u == 0:
            out.append(e // u)
        elif u % e == 0:
            out.append(1)
        else:
            raise UnsupportedNodeError(
                node, f"upsamples by {u} at eST {e}: the phases of the removed strides would overlap unevenly",
                "choose an output stride whose eST here is a multiple or a divisor of the upsampling factor",
            )
    return tuple(out)


def _aligned_with_raw(raw: Grid, g: Grid) -> bool:
    """A global residual (x + f(x), VDSR/DnCNN): f kept every position of the input pixel for
    pixel (stride 1 throughout) and the raw tensor's axes are the same input axes."""
    if any(s != 1 for s in g.stride) or raw.perm is None or g.source_axes is None or raw.source != g.source:
        return False
    return tuple(raw.perm[a] for a in g.axes) == g.source_axes


def _used(value: ir.Value) -> bool:
    """Read by a node or returned by the graph (``Value.uses()`` does not count graph outputs)."""
    return bool(value.uses()) or value.is_graph_output()


def _spatial_preserving_reshape(in_dims, out_dims, axes) -> tuple[ReshapePlan, tuple[int, ...]] | None:
    """A plan when the Reshape only regroups the axes before and after the spatial block."""
    lo, hi = min(axes), max(axes) + 1
    if tuple(axes) != tuple(range(lo, hi)):
        return None
    nb = hi - lo
    block = tuple(in_dims[lo:hi])
    after = in_dims[hi:]
    if any(d is None for d in after):
        return None
    for start in range(len(out_dims) - nb + 1):
        if tuple(out_dims[start : start + nb]) != block:
            continue
        prefix, suffix = tuple(out_dims[:start]), tuple(out_dims[start + nb :])
        if any(d is None for d in suffix) or math.prod(suffix) != math.prod(after):
            continue
        before = in_dims[:lo]
        if lo > 0 and prefix and prefix[0] == before[0] and None not in prefix[1:] + before[1:]:
            if math.prod(prefix[1:]) == math.prod(before[1:]):
                return ReshapePlan((lo, hi), prefix[1:], suffix, True), tuple(range(start, start + nb))
        if None in prefix or None in before or math.prod(prefix) != math.prod(before):
            continue
        return ReshapePlan((lo, hi), prefix, suffix, False), tuple(range(start, start + nb))
    return None


def strides_along(g: Grid) -> list[int]:
    """Divisors of the output's stride: candidates to list in a message (checked by the caller)."""
    s = max(g.stride) if g.stride else 1
    return [d for d in range(1, s + 1) if s % d == 0]


def reachable_text(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def _dims(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)
