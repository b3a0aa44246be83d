"""Rewrite: explicit Pad and Slice nodes on spatial axes move by eST positions.

Rules, for each node with a :class:`ScalePlan`:

* Pad: pads on tensor axis i are multiplied by ``scale[i]`` (constant mode only; the
  analysis refuses reflect/edge padding of a dense tensor).
* Slice: starts and ends on spatial axes are multiplied by eST; an end at or beyond the
  original size becomes "to the end", since the dense tensor is longer than e * size - e.
The node gets new constant inputs; the constants it read may be shared, so they stay.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_dense.grid import GRID
from onnx_dense.passes import _ir
from onnx_dense.passes.plans import ScalePlan

INT64_MAX = np.iinfo(np.int64).max


class DensifyPadsAndSlices(ir.passes.InPlacePass):
    """Apply every ScalePlan."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        editor = _ir.Editor(graph)
        modified = False
        for node, plan in _ir.planned(graph, ScalePlan):
            nodes: list[ir.Node] = []
            base = node.name or node.op_type
            if node.op_type == "Pad":
                pads = _ir.const_array(node.inputs[1]).reshape(-1).astype(np.int64)
                k = len(pads) // 2
                scale = np.array(plan.scale, dtype=np.int64)
                new = np.concatenate([pads[:k] * scale, pads[k:] * scale])
                node.replace_input_with(1, editor.const(nodes, new, base=f"{base}_dense_pads"))
            else:
                _rewrite_slice(node, plan, editor, nodes, base)
            graph.insert_before(node, nodes)
            modified = True
        return ir.passes.PassResult(model, modified)


def _rewrite_slice(node: ir.Node, plan: ScalePlan, editor: _ir.Editor, nodes: list, base: str) -> None:
    x = node.inputs[0]
    dims = x.shape.dims
    rank = len(dims)
    starts = _ir.const_array(node.inputs[1]).reshape(-1).astype(np.int64)
    ends = _ir.const_array(node.inputs[2]).reshape(-1).astype(np.int64)
    axes_v = node.inputs[3] if len(node.inputs) > 3 else None
    steps_v = node.inputs[4] if len(node.inputs) > 4 else None
    axes = _ir.const_array(axes_v).reshape(-1) if axes_v is not None else np.arange(len(starts))
    steps = _ir.const_array(steps_v).reshape(-1) if steps_v is not None else np.ones(len(starts), np.int64)
    g = x.meta[GRID]
    new_starts, new_ends = starts.copy(), ends.copy()
    for i, a in enumerate(axes):
        a = _ir.normalise_axis(int(a), rank)
        e = plan.scale[a]
        if a not in g.axes or e == 1:
            continue
        st, en, _ = slice(int(starts[i]), int(ends[i]), int(steps[i])).indices(int(dims[a]))
        new_starts[i] = st * e
        new_ends[i] = INT64_MAX if en >= int(dims[a]) else en * e
    node.replace_input_with(1, editor.const(nodes, new_starts, base=f"{base}_dense_starts"))
    node.replace_input_with(2, editor.const(nodes, new_ends, base=f"{base}_dense_ends"))
