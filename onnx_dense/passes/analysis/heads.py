"""Heads: global pooling, Flatten/Squeeze/Unsqueeze and fully connected layers.

Global pooling (GlobalAveragePool/GlobalMaxPool, ReduceMean/ReduceMax over all spatial axes)
becomes a window of the original coarse size, dilated by e (GlobalPlan). A Flatten that folds
1x1 spatial axes moves positions next to the batch axis ("inserted" layout, FlattenPlan) so
Gemm/MatMul/Softmax over features work per position (VectorPlan); a folded larger map must
reach a Gemm/MatMul, which becomes a Conv with the map's size as kernel (HeadConvPlan). A head
vector given its unit axes back ((N, 1, 1, C), (N, C, 1, 1)) is a map again. All applied by
passes/densify_heads.py.
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_dense.errors import UnsupportedNodeError
from onnx_dense.grid import PLAN, Grid
from onnx_dense.passes import _ir
from onnx_dense.passes.analysis.base import Rules
from onnx_dense.passes.plans import REDUCE, FlattenPlan, GlobalPlan, HeadConvPlan, VectorPlan


class HeadRules(Rules):
    OPS = {
        **{op: "global_pool" for op in _ir.GLOBAL_OPS}, **{op: "reduce" for op in REDUCE},
        "Flatten": "flatten", "Squeeze": "squeeze", "Unsqueeze": "unsqueeze", "Gemm": "matmul", "MatMul": "matmul",
    }

    def global_pool(self, node: ir.Node, grids):
        g = grids[0]
        self.check_plain(node, g)
        if g.inserted:
            raise UnsupportedNodeError(node, "global pooling of a head vector", "fix the model")
        if g.axes is None:
            n = self.rank_of(node, node.inputs[0]) - 2
            g = self.establish(node, g, node.inputs[0], n)
        kind = {"GlobalAveragePool": "avg", "GlobalMaxPool": "max"}.get(node.op_type)
        return [self.globalise(node, g, kind, True)]

    def reduce_axes(self, node: ir.Node, rank: int) -> list[int] | None:
        axes = node.attributes.get_ints("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            arr = _ir.const_array(node.inputs[1])
            if arr is None:
                raise UnsupportedNodeError(node, "reduction axes computed at run time", "fix the model")
            axes = arr.reshape(-1).tolist()
        if axes is None or len(axes) == 0:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                return []
            return list(range(rank))
        return sorted(_ir.normalise_axis(int(a), rank) for a in axes)

    def reduce(self, node: ir.Node, grids):
        g = grids[0]
        if any(gr is not None for gr in grids[1:]):
            raise UnsupportedNodeError(node, "image-dependent reduction axes", "fix the model")
        self.check_plain(node, g)
        rank = self.rank_of(node, node.inputs[0])
        axes = self.reduce_axes(node, rank)
        keepdims = bool(node.attributes.get_int("keepdims", 1))
        if g.inserted:
            if 0 in axes:
                raise UnsupportedNodeError(node, "reduction over the batch axis of a head vector")
            node.meta[PLAN] = VectorPlan("axes", g.rank)
            return [g]
        if g.axes is None:
            return [g] if keepdims or not axes else [None]
        spatial = set(g.axes)
        touched = spatial & set(axes)
        if not touched:
            if not keepdims:
                g = g.replace(axes=tuple(a - sum(1 for r in axes if r < a) for a in g.axes))
            return [g]
        if touched != spatial:
            raise UnsupportedNodeError(node, f"reduces over some spatial axes ({sorted(touched)}) but not all of them")
        if set(axes) != spatial:
            raise UnsupportedNodeError(node, "reduces over spatial and channel axes together")
        kind = {"ReduceMean": "avg", "ReduceMax": "max"}.get(node.op_type)
        return [self.globalise(node, g, kind, keepdims)]

    def globalise(self, node: ir.Node, g: Grid, kind: str | None, keepdims: bool) -> Grid:
        """Common part of global pooling: a window covering the whole original map."""
        self.global_nodes[node.name] = node
        perm = None
        rank = self.rank_of(node, node.inputs[0])
        n = g.rank
        if not keepdims:
            others = [a for a in range(1, rank) if a not in g.axes]
            perm = (0, *g.axes, *others)
        node.meta[PLAN] = GlobalPlan(kind or "", g.size, g.est, g.axes, keepdims, perm)
        rf_size = tuple(r + (s - 1) * S for r, s, S in zip(g.rf_size, g.size, g.stride))
        dense_size = tuple(L - e * (s - 1) for L, e, s in zip(g.dense_size, g.est, g.size))
        out = g.replace(size=(1,) * n, dense_size=dense_size, rf_size=rf_size, global_from=(node.name,))
        if not keepdims:
            out = out.replace(axes=tuple(range(1, n + 1)), inserted=True)
        return out

    def flatten(self, node: ir.Node, grids):
        g = grids[0]
        rank = self.rank_of(node, node.inputs[0])
        axis = _ir.normalise_axis(node.attributes.get_int("axis", 1), rank)
        if g.axes is None:
            return [g.replace(perm=None)]
        if g.inserted:
            if rank == 2 and axis == 1:
                node.meta[PLAN] = VectorPlan("identity", g.rank)
                return [g]
            raise UnsupportedNodeError(node, "flattens a head vector of rank > 2")
        if axis != 1:
            if all(a < axis for a in g.axes) and g.is_trivial:
                return [g.replace(perm=None, axes=None)]
            raise UnsupportedNodeError(node, f"Flatten with axis={axis}: only axis=1 (keep the batch) is supported")
        return [self.fold(node, g, rank)]

    def fold(self, node: ir.Node, g: Grid, rank: int) -> Grid:
        """Flatten-like node that folds every non-batch axis, spatial ones included."""
        self.check_plain(node, g, "a second Flatten")
        others = [a for a in range(1, rank) if a not in g.axes]
        if all(s == 1 for s in g.size):
            perm = (0, *g.axes, *others)
            node.meta[PLAN] = FlattenPlan(False, perm, len(others) != 1)
            return g.replace(axes=tuple(range(1, g.rank + 1)), inserted=True)
        if len(others) != 1:
            raise UnsupportedNodeError(node, "flattens a map with several feature axes into a fully connected layer")
        node.meta[PLAN] = FlattenPlan(True)
        dims = _ir.require_static(node.inputs[0], "input", node)
        return g.replace(flattened=True, unflat_shape=tuple(dims))

    def squeeze(self, node: ir.Node, grids):
        g = grids[0]
        rank = self.rank_of(node, node.inputs[0])
        axes = node.attributes.get_ints("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            arr = _ir.const_array(node.inputs[1])
            if arr is None:
                raise UnsupportedNodeError(node, "squeeze axes computed at run time", "fix the model")
            axes = arr.reshape(-1).tolist()
        dims = _ir.static_dims(node.inputs[0])
        if axes is None:
            axes = [i for i, d in enumerate(dims) if d == 1]
        axes = sorted(_ir.normalise_axis(int(a), rank) for a in axes)
        if g.axes is None:
            return [g.replace(perm=None)]
        if g.inserted:
            raise UnsupportedNodeError(node, "squeezes a head vector")
        touched = set(axes) & set(g.axes)
        if not touched:
            return [g.replace(axes=tuple(a - sum(1 for r in axes if r < a) for a in g.axes))]
        if touched != set(g.axes) or any(s != 1 for s in g.size):
            raise UnsupportedNodeError(node, "squeezes some spatial axes but not all, or axes larger than 1")
        if 0 in axes:
            raise UnsupportedNodeError(node, "squeezes the batch axis")
        others = [a for a in range(1, rank) if a not in g.axes and a not in axes]
        perm = (0, *g.axes, *others)
        node.meta[PLAN] = FlattenPlan(False, perm, len(others) != 1)
        return [g.replace(axes=tuple(range(1, g.rank + 1)), inserted=True)]

    def unsqueeze(self, node: ir.Node, grids):
        g = grids[0]
        axes = node.attributes.get_ints("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            arr = _ir.const_array(node.inputs[1])
            if arr is None:
                raise UnsupportedNodeError(node, "unsqueeze axes computed at run time", "fix the model")
            axes = arr.reshape(-1).tolist()
        out_rank = self.rank_of(node, node.outputs[0])
        axes = sorted(_ir.normalise_axis(int(a), out_rank) for a in axes)
        if g.axes is None:
            return [g.replace(perm=None)]
        if g.inserted:
            unfolded = None
            if 0 not in axes:
                unfolded = self.unfold(node, g, _ir.static_dims(node.inputs[0]), _ir.static_dims(node.outputs[0]))
            if unfolded is not None:
                return [unfolded]
            raise UnsupportedNodeError(node, "unsqueezes a head vector")
        self.check_plain(node, g)
        new_axes = []
        kept = [i for i in range(out_rank) if i not in axes]
        for a in g.axes:
            new_axes.append(kept[a])
        return [g.replace(axes=tuple(new_axes))]

    def unfold(self, node: ir.Node, g: Grid, in_dims, out_dims) -> Grid | None:
        """A head vector (N, C) given its unit spatial axes back, as (N, 1, 1, C) or (N, C, 1, 1):
        Keras' GlobalAveragePooling2D + Reshape((1, 1, C)) (EfficientNet's squeeze-and-excitation,
        DeepLab's image pooling), or Unsqueeze(axes=[2, 3]). The dense tensor, positions after
        the batch axis, is a map again: as it is (channels last) or transposed (channels first)."""
        n = g.rank
        if in_dims is None or out_dims is None or len(in_dims) != 2 or len(out_dims) != 2 + n or in_dims[1] is None:
            return None
        c = in_dims[1]
        if tuple(out_dims[1:]) == (1,) * n + (c,):
            perm, axes = tuple(range(n + 2)), tuple(range(1, n + 1))
        elif tuple(out_dims[1:]) == (c,) + (1,) * n:
            perm, axes = (0, n + 1, *range(1, n + 1)), tuple(range(2, n + 2))
        else:
            return None
        node.meta[PLAN] = FlattenPlan(False, perm, False)
        return g.replace(axes=axes, inserted=False)

    def matmul(self, node: ir.Node, grids):
        a, b = grids[0], grids[1] if len(grids) > 1 else None
        if a is None or b is not None or any(gr is not None for gr in grids[2:]):
            raise UnsupportedNodeError(node, "matrix product with image-dependent weights", "fix the model")
        weight = node.inputs[1]
        if weight.shape is None or weight.shape.rank() != 2:
            raise UnsupportedNodeError(node, "fully connected layer whose weight is not a 2-D tensor")
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            raise UnsupportedNodeError(node, "Gemm with transA=1 on an image tensor")
        if a.flattened:
            n = a.rank
            shape = a.unflat_shape
            feature = next(i for i in range(1, len(shape)) if i not in a.axes)
            perm = (0, *range(2, 2 + n), 1)
            node.meta[PLAN] = HeadConvPlan(shape, a.axes, feature, a.est, perm)
            rf_size = tuple(r + (s - 1) * S for r, s, S in zip(a.rf_size, a.size, a.stride))
            dense_size = tuple(L - e * (s - 1) for L, e, s in zip(a.dense_size, a.est, a.size))
            return [
                a.replace(
                    axes=tuple(range(1, n + 1)), flattened=False, inserted=True, unflat_shape=None,
                    size=(1,) * n, dense_size=dense_size, rf_size=rf_size, global_from=(),
                )
            ]
        if a.inserted:
            node.meta[PLAN] = VectorPlan("gemm" if node.op_type == "Gemm" else "identity", a.rank)
            return [a]
        rank = self.rank_of(node, node.inputs[0])
        if a.axes is not None and rank - 1 in a.axes and not a.is_trivial:
            raise UnsupportedNodeError(node, "matrix product over a spatial axis")
        return [a]
