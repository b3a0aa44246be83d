"""Rewrite: Reshapes around the spatial block take the spatial dims from the running tensor.

Exporters bake the traced size into Reshape targets (channel shuffle, grouped
attention). For each node with a :class:`ReshapePlan` the target becomes
Concat(batch of x?, prefix, Shape(x)[spatial block], suffix), so the dense model reshapes
correctly at any image size and at any eST.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_dense.passes import _ir
from onnx_dense.passes.plans import ReshapePlan


class DensifyReshapes(ir.passes.InPlacePass):
    """Apply every ReshapePlan."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        editor = _ir.Editor(graph)
        modified = False
        for node, plan in _ir.planned(graph, ReshapePlan):
            nodes: list[ir.Node] = []
            base = node.name or "Reshape"
            shape = editor.op(nodes, "Shape", [node.inputs[0]], base=f"{base}_input_shape")
            parts = []
            if plan.batch_from_input:
                parts.append(_slice(editor, nodes, shape, 0, 1, base))
            if plan.prefix:
                parts.append(editor.const(nodes, np.array(plan.prefix, dtype=np.int64), base=f"{base}_prefix"))
            lo, hi = plan.in_spatial
            parts.append(_slice(editor, nodes, shape, lo, hi, base))
            if plan.suffix:
                parts.append(editor.const(nodes, np.array(plan.suffix, dtype=np.int64), base=f"{base}_suffix"))
            target = editor.op(nodes, "Concat", parts, {"axis": 0}, base=f"{base}_target")
            graph.insert_before(node, nodes)
            node.replace_input_with(1, target)
            if "allowzero" in node.attributes:
                node.attributes.pop("allowzero")
            modified = True
        return ir.passes.PassResult(model, modified)


def _slice(editor, nodes, shape: ir.Value, lo: int, hi: int, base: str) -> ir.Value:
    start = editor.const(nodes, np.array([lo], dtype=np.int64), base=f"{base}_from{lo}")
    end = editor.const(nodes, np.array([hi], dtype=np.int64), base=f"{base}_to{hi}")
    return editor.op(nodes, "Slice", [shape, start, end], base=f"{base}_dims{lo}_{hi}")
