"""Normalise: cut the graph at the tensors named by ``--outputs``.

Rules: each name must be a value computed by a node (not an input or a weight); the cut
tensors become the graph's outputs, in the order given, and whatever no longer feeds an
output is removed. A dense rewrite of a detector or segmenter usually ends at its backbone.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnx_dense.errors import DenseError


class CutAtOutputs(ir.passes.InPlacePass):
    def __init__(self, names: list[str] | None) -> None:
        super().__init__()
        self.names = list(names or [])

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.names:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        values = {out.name: out for node in graph for out in node.outputs if out.name}
        chosen = []
        for name in self.names:
            if name not in values:
                if name in graph.initializers or any(v.name == name for v in graph.inputs):
                    raise DenseError(f"--outputs '{name}': is a model input or weight, not a computed tensor")
                raise DenseError(
                    f"--outputs '{name}': no tensor of that name in the model (see `onnx-dense inspect --all` for names)"
                )
            if values[name] in chosen:
                raise DenseError(f"--outputs '{name}' is named twice")
            chosen.append(values[name])
        graph.outputs.clear()
        graph.outputs.extend(chosen)
        RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, True)
