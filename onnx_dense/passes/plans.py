"""The contract between analysis and rewrite: what the analysis leaves, what each pass applies.

The analysis (passes/analyse.py, rules in passes/analysis/) changes nothing in the graph. It
leaves

* a :class:`~onnx_dense.grid.Grid` on every image-derived value (``value.meta[GRID]``),
* one plan below on every node the rewrite must change (``node.meta[PLAN]``),
* an :class:`Analysis` in ``model.meta[ANALYSIS]`` (outputs, input layouts, global context),
* under strategy "fragments", a :class:`PhasePlan` in ``model.meta[PHASES]``,

or refuses with a :class:`~onnx_dense.errors.DenseError` before any mutation
(:class:`UnreachableStride` when only the output stride asked for is wrong).

Who applies what: SpatialPlan -> densify_windows.py; ScalePlan -> densify_pads.py;
JoinPlan -> align_joins.py; GlobalPlan, FlattenPlan, HeadConvPlan, VectorPlan ->
densify_heads.py; ReshapePlan -> densify_reshapes.py; PhasePlan -> fragments.py.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Sequence

import onnx_ir as ir

from onnx_dense.errors import DenseError
from onnx_dense.grid import Grid, fmt
from onnx_dense.passes import _ir

ANALYSIS = "onnx_dense.analysis"  # model.meta: the Analysis
PHASES = "onnx_dense.fragments"  # model.meta: the PhasePlan (strategy "fragments")
DENSE_SHAPE = "onnx_dense.dense_shape"  # Value.meta flag: computed from the shape of a dense tensor

MIN_OPSET, MAX_OPSET = 11, 23


# ----------------------------------------------------------------------------- strategy


class Strategy(str, enum.Enum):
    """How the dense model computes the removed strides' phases (``--strategy``).

    DILATE: one dilated graph (passes/densify_*.py). FRAGMENTS: the original ops run once per
    phase, stacked on the batch axis (passes/fragments.py). AUTO (the default, for the CLI and
    the API alike): dilate where the analysis allows it, else fragments. A str: compares and
    prints as its value, so metadata and messages read "dilate", "fragments", "auto".
    """

    AUTO = "auto"
    DILATE = "dilate"
    FRAGMENTS = "fragments"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: "str | Strategy") -> "Strategy":
        try:
            return cls(value)
        except ValueError:
            raise DenseError(f"--strategy '{value}': expected one of {', '.join(s.value for s in cls)}") from None


DEFAULT_STRATEGY = Strategy.AUTO


# ----------------------------------------------------------------------------- node plans


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


# ----------------------------------------------------------------------------- fragments


@dataclasses.dataclass(frozen=True)
class Level:
    """One removed stride: phases ``prod(factor)``, neighbouring phases ``shift`` input pixels apart."""

    factor: tuple[int, ...]
    shift: tuple[int, ...]

    @property
    def phases(self) -> int:
        return math.prod(self.factor)


Layout = tuple  # tuple[Level, ...], innermost (first split) first


@dataclasses.dataclass
class PhasePlan:
    """Strategy "fragments" (passes/analysis/phases.py plans, passes/fragments.py applies)."""

    layouts: dict[ir.Value, Layout]
    splits: list[tuple[ir.Node, Level]]
    collapses: list[tuple[ir.Node, int]]  # (upsampling node, phases kept per entry of the dropped block)
    reshapes: list[ir.Node]
    resizes: list[ir.Node]
    outputs: list[tuple[ir.Value, Layout]]
    global_values: set[ir.Value]
    global_outputs: set[str] = dataclasses.field(default_factory=set)  # outputs downstream of global context
    # What the runtime needs to run the batch of phases one phase of a level at a time
    # (runtime/fragment_batches.py): the levels split at each depth (the number of levels before
    # them), and the first depth whose phases cannot run apart, with why.
    levels_at: dict[int, dict[Level, str]] = dataclasses.field(default_factory=dict)  # level -> a node splitting it there
    depth_limit: tuple[int, str] | None = None
    cuts: dict[int, list[ir.Value]] = dataclasses.field(default_factory=dict)  # set by the rewrite: moves' outputs
    sources: dict[int, list[tuple]] = dataclasses.field(default_factory=dict)  # and (map read, made, every)
    interleaved: dict[str, dict] = dataclasses.field(default_factory=dict)  # output -> how its phases interleave


# ----------------------------------------------------------------------------- the whole model


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


class UnreachableStride(DenseError):
    """No plan exists for this output stride, though the model itself is fine: the refusal
    carries what a caller needs to offer another (``reachable``: output strides per axis)."""

    def __init__(
        self, output: str, target: Sequence[int], dense_stride: Sequence[int], stride: Sequence[int],
        reachable: Sequence[Sequence[int]],
    ) -> None:
        self.output, self.target = output, tuple(target)
        self.dense_stride, self.stride = tuple(dense_stride), tuple(stride)
        self.reachable = [tuple(r) for r in reachable]
        super().__init__(
            f"output '{output}': output stride {fmt(self.target)} is not reachable: the original predicts "
            f"every {fmt(self.stride)} input pixels, and setting layer strides to 1 can only give the stride "
            f"found at the input of one of its strided layers; "
            f"reachable output strides: {', '.join(map(fmt, self.reachable)) or 'none'}"
        )

    def with_reachable(self, reachable: Sequence[Sequence[int]]) -> "UnreachableStride":
        return UnreachableStride(self.output, self.target, self.dense_stride, self.stride, reachable)


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
