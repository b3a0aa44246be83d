"""Rewrite: operands of a join are cropped to a common dense length.

Rules, for each node with a :class:`JoinPlan`: every operand that carries a grid is sliced on
the plan's spatial axes to the element-wise minimum of all such operands' run-time lengths.
The crop is computed from ``Shape`` at run time, so it holds at every input size. Positions
cut off are ones only one branch had: the subgrid (the original's predictions) is never cut.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_dense.grid import GRID
from onnx_dense.passes import _ir
from onnx_dense.passes.plans import JoinPlan


class AlignJoins(ir.passes.InPlacePass):
    """Apply every JoinPlan."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        editor = _ir.Editor(graph)
        modified = False
        for node, plan in _ir.planned(graph, JoinPlan):
            gridded = [i for i, v in enumerate(node.inputs) if v is not None and v.meta.get(GRID) is not None]
            nodes: list[ir.Node] = []
            base = node.name or node.op_type
            axes = editor.const(nodes, np.array(plan.axes, dtype=np.int64), base=f"{base}_join_axes")
            lengths = [
                editor.op(nodes, "Gather", [editor.op(nodes, "Shape", [node.inputs[i]], base=f"{base}_shape{i}"), axes],
                          {"axis": 0}, base=f"{base}_len{i}")
                for i in gridded
            ]
            shortest = editor.op(nodes, "Min", lengths, base=f"{base}_shortest")
            zeros = editor.const(nodes, np.zeros(len(plan.axes), dtype=np.int64), base=f"{base}_join_zeros")
            for i in gridded:
                cropped = editor.op(nodes, "Slice", [node.inputs[i], zeros, shortest, axes], base=f"{base}_crop{i}")
                node.replace_input_with(i, cropped)
            graph.insert_before(node, nodes)
            modified = True
        return ir.passes.PassResult(model, modified)
