"""What every rule module shares: the analyser's state and the helpers rules call.

A rule is a method ``rule(node, grids) -> list of output grids`` of a ``Rules`` subclass,
registered for its ops in the class's ``OPS`` (op type -> method name). It may put a plan on
the node (``node.meta[PLAN]``) and must raise a DenseError for anything it cannot make
equivalent. State (set by the driver, passes/analyse.py): ``model``, ``graph``, ``opset``,
``output_stride``, ``fragments``, ``per_phase_global``, ``input_axes`` (spatial axes of each
graph input), ``context_globals`` (global ops whose result is broadcast back),
``global_nodes``.
"""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir

from onnx_dense.errors import DenseError, UnsupportedNodeError, node_label
from onnx_dense.grid import GRID, Grid, fmt
from onnx_dense.passes import _ir


class Rules:
    OPS: dict[str, str] = {}
    # Under the "fragments" strategy every phase runs the original ops unchanged, so global
    # context, upsampling and whole-image normalisation stay exact; see passes/fragments.py.
    fragments = False
    per_phase_global = False
    model: ir.Model
    graph: ir.Graph
    opset: int
    output_stride: int | tuple[int, ...] | None
    input_axes: dict[str, tuple[int, ...]]
    context_globals: set[str]
    global_nodes: dict[str, ir.Node]

    def grid(self, value: ir.Value | None) -> Grid | None:
        if value is None:
            return None
        return value.meta.get(GRID)

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

    def rank_of(self, node: ir.Node, value: ir.Value) -> int:
        if value.shape is None:
            raise DenseError(f"node {node_label(node)}: rank of '{value.name}' unknown; give --input-shape")
        return value.shape.rank()


def used(value: ir.Value) -> bool:
    """Read by a node or returned by the graph (``Value.uses()`` does not count graph outputs)."""
    return bool(value.uses()) or value.is_graph_output()
