"""Ops that keep the grid: activations, normalisations over channels, channel-wise axis ops.

They must not run over a spatial axis once the net is dense (Softmax over W, LayerNorm over
H, W); on a head vector ("inserted" layout) their axis moves by the number of spatial axes
(VectorPlan, passes/densify_heads.py). Whole-image normalisation (InstanceNorm, ...) is
refused at e > 1 under dilate.
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_dense.errors import UnsupportedNodeError
from onnx_dense.grid import PLAN, Grid, fmt
from onnx_dense.passes import _ir
from onnx_dense.passes.analysis.base import Rules
from onnx_dense.passes.plans import CHANNEL_GLOBAL, UNARY, VectorPlan


class PointwiseRules(Rules):
    OPS = {
        **{op: "unary" for op in UNARY}, **{op: "channel_global" for op in CHANNEL_GLOBAL},
        "BatchNormalization": "batchnorm", "LRN": "channel_op", "Softmax": "softmax", "LogSoftmax": "softmax",
        "Hardmax": "softmax", "LayerNormalization": "layernorm", "LpNormalization": "axis_op", "Split": "axis_op",
        "Gather": "axis_op", "ArgMax": "arg_reduce", "ArgMin": "arg_reduce", "Transpose": "transpose",
    }

    def unary(self, node: ir.Node, grids):
        g = grids[0]
        if g is None or any(gr is not None for gr in grids[1:]):
            raise UnsupportedNodeError(node, "image-dependent parameters are not supported", "fix the model")
        results: list[Grid | None] = [g]
        results += [g if node.op_type != "Dropout" else None for _ in node.outputs[1:]]
        return results

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
