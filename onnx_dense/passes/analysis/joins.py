"""Joins: elementwise ops of several operands (Add, Mul, Where, ...) and Concat.

Operands must agree on S and e. Operands equal in the original but not in dense length are
cropped to the shortest at the end (JoinPlan, passes/align_joins.py). A 1x1 map of global
context broadcast back onto a feature map is refused at e > 1 under plain dilate
(passes/analysis/global_context.py says where it is allowed). A grid-free operand must not
vary over space once the net is dense (a positional encoding).
"""

from __future__ import annotations

import math

import onnx_ir as ir

from onnx_dense.errors import UnsupportedNodeError
from onnx_dense.grid import PLAN, Grid, fmt, merge_rf
from onnx_dense.passes import _ir
from onnx_dense.passes.analysis.base import Rules
from onnx_dense.passes.plans import BROADCAST, JoinPlan, VectorPlan


class JoinRules(Rules):
    OPS = {**{op: "broadcast" for op in BROADCAST}, "Concat": "concat"}

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


def _aligned_with_raw(raw: Grid, g: Grid) -> bool:
    """A global residual (x + f(x), VDSR/DnCNN): f kept every position of the input pixel for
    pixel (stride 1 throughout) and the raw tensor's axes are the same input axes."""
    if any(s != 1 for s in g.stride) or raw.perm is None or g.source_axes is None or raw.source != g.source:
        return False
    return tuple(raw.perm[a] for a in g.axes) == g.source_axes
