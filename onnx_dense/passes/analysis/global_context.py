"""Global context: a global pool's result broadcast back onto a feature map.

A squeeze-and-excitation block (Mul by a 1x1 map) or an image pooling branch (Resize of a 1x1
map) mixes the whole image into every position, which no single dilated tensor reproduces:
refused when e > 1 under plain dilate, allowed under fragments (every phase is the original)
and under --per-phase-global (passes/phase_global.py lowers it). Where e = 1 the global op is
left as it is, and so are the head-vector plans downstream of it.
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_dense.errors import UnsupportedNodeError
from onnx_dense.grid import PLAN, Grid, fmt
from onnx_dense.passes import _ir
from onnx_dense.passes.analysis.base import Rules
from onnx_dense.passes.plans import FlattenPlan, GlobalPlan, VectorPlan


class GlobalContextRules(Rules):
    OPS = {}

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
