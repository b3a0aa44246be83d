"""Analyse: where every tensor's positions sit, in the original and in the dense model (the driver).

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
  Its output keeps its input's information stride (grid.py): an upsampled map's predictions
  are as far apart as its source's; a join carries the finest of its operands', any node at
  least its own grid stride. An output is on R also where its information is (I / e = R).
  A segmentation head's final upsampling is cut off and rebuilt by the pipeline instead
  (passes/analysis/final_upsampling.py, passes/final_upsampling.py).
* A head vector (N, C) reshaped or unsqueezed to (N, 1, 1, C) or (N, C, 1, 1) is a map
  again: its dense tensor (N, positions, C) is kept or transposed to match.
* Every output must end on a dense grid D = min(R, S), and on every axis some output on R
  itself (R above every output's information stride would change nothing).

Strategy "fragments" (``AnalyseGrid(R, "fragments")``, lowered by passes/fragments.py): every
phase runs the original ops, so global context broadcast back, whole-image normalisation,
non-constant padding, shapes read from dense tensors and upsampling are allowed at e > 1; an
upsampling by u leaves e/u (or 1 when u is a multiple of e; anything else is refused).
``per_phase_global`` (dilate): global context broadcast back is allowed at e > 1 and lowered
by passes/phase_global.py.

Where things are:

* passes/plans.py: what the analysis hands the rewrite (plans, Analysis, op tables).
* passes/analysis/<pass>.py: the rules, one module per pass that applies their plans
  (windows, pads, joins, heads, reshapes, global_context, phases) plus those whose ops the
  rewrite leaves alone (pointwise, upsampling); base.py holds the helpers they share.
* This module: the walk over the graph, the output checks and the pass ``AnalyseGrid``.

A new rule: a method ``rule(node, grids) -> output grids`` in the module named after the
pass that applies its plan (a new module, a ``Rules`` subclass, for a new pass), its op
types in that class's ``OPS``, its plan type in plans.py; a new class goes into
``RULE_CLASSES`` below (an op claimed by two classes is a bug: the last one wins). Checks over
the whole graph after the walk go in ``_Analyser.run``; a strategy's own plan after the walk
(like fragments' PhasePlan, passes/analysis/phases.py) is a pass the pipeline's analyse step
runs. Refuse with a DenseError naming the node; never touch the graph here.
"""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir

from onnx_dense.errors import DenseError, UnsupportedNodeError
from onnx_dense.grid import GRID, PLAN, Grid, fmt, trivial_grid
from onnx_dense.passes import _ir
from onnx_dense.passes.analysis.global_context import GlobalContextRules
from onnx_dense.passes.analysis.heads import HeadRules
from onnx_dense.passes.analysis.joins import JoinRules
from onnx_dense.passes.analysis.pads import PadRules
from onnx_dense.passes.analysis.pointwise import PointwiseRules
from onnx_dense.passes.analysis.reshapes import ReshapeRules
from onnx_dense.passes.analysis.upsampling import UpsamplingRules
from onnx_dense.passes.analysis.windows import WindowRules
from onnx_dense.passes.fold_constants import ASSUMED_DIMS
from onnx_dense.passes.plans import (
    ANALYSIS, DENSE_SHAPE, MAX_OPSET, MIN_OPSET, SHAPE_OF, UPSAMPLING, Analysis, OutputInfo, Strategy,
    UnreachableStride,
)

RULE_CLASSES = (
    WindowRules, UpsamplingRules, PadRules, JoinRules, HeadRules, ReshapeRules, GlobalContextRules, PointwiseRules,
)


class AnalyseGrid(ir.passes.InPlacePass):
    """Compute grids and plans for the requested output stride (None: keep every stride)."""

    def __init__(
        self,
        output_stride: int | Sequence[int] | None,
        strategy: Strategy | str = Strategy.DILATE,
        per_phase_global: bool = False,
    ) -> None:
        super().__init__()
        self.output_stride = output_stride
        self.strategy = Strategy.parse(strategy)  # FRAGMENTS: the graph runs per phase (passes/fragments.py)
        self.per_phase_global = per_phase_global  # dilate: SE context as per-phase means (passes/phase_global.py)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        analyser = _Analyser(model, self.output_stride)
        analyser.fragments = self.strategy == "fragments"
        analyser.per_phase_global = self.per_phase_global
        model.meta[ANALYSIS] = analyser.run()
        return ir.passes.PassResult(model, False)


class _Analyser(*RULE_CLASSES):
    def __init__(self, model: ir.Model, output_stride) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = _ir.opset(model)
        self.output_stride = output_stride
        self.input_axes: dict[str, tuple[int, ...]] = {}
        self.context_globals: set[str] = set()
        self.global_nodes: dict[str, ir.Node] = {}
        self.rules = {op: getattr(self, method) for cls in RULE_CLASSES for op, method in cls.OPS.items()}

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
        self.check_stride_reached(outputs)
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
                out.meta[GRID] = with_information_stride(node, grids, g)

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
            # An upsampled output (information stride I above its grid stride) also ends on R
            # where its information does: I / e == min(R, I) (R = I: nothing removed).
            info_dense = tuple(i // e for i, e in zip(g.info_stride, g.est))
            on_info = g.info is not None and all(d == min(R, i) for d, R, i in zip(info_dense, tgt, g.info_stride))
            for D, S, R in zip(g.dense_stride, g.stride, tgt):
                if D != min(R, S) and not on_info:
                    candidates = [(v,) for v in self.model_strides(value)]  # the pipeline narrows them
                    raise UnreachableStride(value.name, tgt, g.dense_stride, g.stride, candidates)
        return OutputInfo(value.name, g, value.shape)

    def check_stride_reached(self, outputs: list[OutputInfo]) -> None:
        """On every axis some output must end on the stride asked for: one above every output's
        own stride (or above 1 with no spatial op) would leave the model unchanged, yet labelled
        with that stride."""
        target = self.target_or_none()
        if target is None:
            return
        grids = [(o.name, o.grid) for o in outputs if o.grid is not None and o.grid.axes is not None]
        if not grids:
            if any(r > 1 for r in target) and self.graph.outputs:
                ones = (1,) * len(target)
                raise UnreachableStride(self.graph.outputs[0].name, target, ones, ones, [(1,)])
            return
        rank = max(g.rank for _, g in grids)
        grids = [(name, g) for name, g in grids if g.rank == rank]
        tgt = target * rank if len(target) == 1 else target
        if len(tgt) != rank:
            return  # the Conv/pool rules refuse a count of values that fits no node
        coarsest = tuple(max(g.info_stride[i] for _, g in grids) for i in range(rank))
        if any(r > s for r, s in zip(tgt, coarsest)):
            name, g = max(grids, key=lambda item: item[1].info_stride)
            raise UnreachableStride(name, tgt, g.dense_stride, g.info_stride, [(v,) for v in strides_along(g)])

    def model_strides(self, value: ir.Value) -> list[int]:
        g = self.grid(value)
        return strides_along(g)

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
                    f"node {label}: {'its branch was chosen' if label.endswith('(If)') else 'its operands were computed'} "
                    f"from the size of spatial axis {spatial[0]} of '{value.name}', "
                    f"which the dense model changes (eST {fmt(g.est)}); cut the graph before it with --outputs, "
                    "or choose an output stride that keeps it at eST 1"
                )


def with_information_stride(node: ir.Node, grids: Sequence[Grid | None], out: Grid) -> Grid:
    """The output grid with its information stride: an upsampling keeps its input's (its grid
    is finer than its predictions); a join of several maps carries the finest of theirs; any
    node's is at least its grid stride."""
    if out.axes is None or not out.stride:
        return out
    inputs = [g for g in grids if g is not None and g.axes is not None and g.rank == out.rank]
    if not inputs:
        return out
    info = tuple(min(g.info_stride[i] for g in inputs) for i in range(out.rank))
    info = tuple(max(i, s) for i, s in zip(info, out.stride))
    if info == tuple(out.stride):
        return out.replace(info=None, upsampled_from=None)
    if any(a > b for a, b in zip(inputs[0].stride, out.stride)):  # this node upsamples
        src = node.name or node.op_type
    else:
        src = next((g.upsampled_from for g in inputs if g.upsampled_from), None)
    return out.replace(info=info, upsampled_from=src)


def strides_along(g: Grid) -> list[int]:
    """Divisors of the output's stride: candidates to list in a message (checked by the caller)."""
    s = max(g.info_stride) if g.stride else 1
    return [d for d in range(1, s + 1) if s % d == 0]
