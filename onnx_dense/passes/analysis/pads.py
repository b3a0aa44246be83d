"""Pads and slices of spatial axes: amounts scaled by e (ScalePlan, passes/densify_pads.py).

Only constant padding under dilate (reflect/edge would copy dense neighbours). A Pad of the
raw input, before any spatial op says which axes are spatial (Keras' ZeroPadding2D before
the first Conv), moves the receptive field's start by its begin pads.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_dense.errors import UnsupportedNodeError
from onnx_dense.grid import PLAN, Grid, fmt
from onnx_dense.passes import _ir
from onnx_dense.passes.analysis.base import Rules
from onnx_dense.passes.plans import ScalePlan, VectorPlan


class PadRules(Rules):
    OPS = {"Pad": "pad", "Slice": "slice"}

    def pad(self, node: ir.Node, grids):
        g = grids[0]
        if any(gr is not None for gr in grids[1:]):
            raise UnsupportedNodeError(node, "image-dependent pads", "fix the model")
        rank = self.rank_of(node, node.inputs[0])
        if g.axes is not None:
            self.check_plain(node, g)
        if g.inserted:
            raise UnsupportedNodeError(node, "pads a head vector")
        pads = _ir.const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None:
            pads = node.attributes.get_ints("pads")
            if pads is None:
                if g.axes is None:  # the raw input, padded at run time: nothing to scale
                    return [g]
                raise UnsupportedNodeError(node, "pads computed at run time", "fix the model")
        pads = np.asarray(pads).reshape(-1).tolist()
        axes = list(range(rank))
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            arr = _ir.const_array(node.inputs[3])
            if arr is None:
                if g.axes is None:
                    return [g]
                raise UnsupportedNodeError(node, "pad axes computed at run time", "fix the model")
            axes = [_ir.normalise_axis(int(x), rank) for x in arr.reshape(-1)]
        k = len(axes)
        begin = {a: int(pads[i]) for i, a in enumerate(axes)}
        end = {a: int(pads[k + i]) for i, a in enumerate(axes)}
        if g.axes is None:
            return [self.shift_origin(g, begin)]
        mode = node.attributes.get_string("mode", "constant")
        spatial_padded = any(begin.get(a, 0) or end.get(a, 0) for a in g.axes)
        if spatial_padded and g.is_dense and mode != "constant" and not self.fragments:
            raise UnsupportedNodeError(
                node, f"'{mode}' padding at eST {fmt(g.est)} copies dense neighbours, not the original's"
            )
        scale = tuple(g.est[g.axes.index(a)] if a in g.axes else 1 for a in axes)
        if any(s > 1 for s in scale) and spatial_padded:
            node.meta[PLAN] = ScalePlan(scale)
        pb = tuple(begin.get(a, 0) for a in g.axes)
        pe = tuple(end.get(a, 0) for a in g.axes)
        return [
            g.replace(
                size=tuple(s + b + e for s, b, e in zip(g.size, pb, pe)),
                dense_size=tuple(L + e * (b + x) for L, e, b, x in zip(g.dense_size, g.est, pb, pe)),
                rf_start=tuple(st - b * S for st, b, S in zip(g.rf_start, pb, g.stride)),
            )
        ]

    def slice(self, node: ir.Node, grids):
        g = grids[0]
        if any(gr is not None for gr in grids[1:]):
            raise UnsupportedNodeError(node, "image-dependent slice bounds", "fix the model")
        if g.axes is None:
            return [g]
        self.check_plain(node, g)
        rank = self.rank_of(node, node.inputs[0])
        arrays = [_ir.const_array(v) if v is not None else None for v in node.inputs[1:5]]
        if len(node.inputs) < 3 or arrays[0] is None or arrays[1] is None:
            raise UnsupportedNodeError(node, "slice bounds computed at run time (or opset < 10 Slice)", "fix the model")
        starts, ends = arrays[0].reshape(-1).tolist(), arrays[1].reshape(-1).tolist()
        axes = arrays[2].reshape(-1).tolist() if len(arrays) > 2 and arrays[2] is not None else list(range(len(starts)))
        steps = arrays[3].reshape(-1).tolist() if len(arrays) > 3 and arrays[3] is not None else [1] * len(starts)
        axes = [_ir.normalise_axis(int(a), rank) for a in axes]
        if g.inserted:
            if any(a == 0 for a in axes):
                raise UnsupportedNodeError(node, "slices the batch axis of a head vector")
            node.meta[PLAN] = VectorPlan("axes", g.rank)
            return [g]
        dims = _ir.require_static(node.inputs[0], "input", node)
        size, dense_size, rf_start = list(g.size), list(g.dense_size), list(g.rf_start)
        touched = False
        for a, st, en, sp in zip(axes, starts, ends, steps):
            if a not in g.axes:
                continue
            k = g.axes.index(a)
            n_in = int(dims[a])
            st_n, en_n, _ = slice(int(st), int(en), int(sp)).indices(n_in)
            if (st_n, en_n) == (0, n_in) and sp == 1:
                continue
            if sp != 1:
                raise UnsupportedNodeError(node, "strided slicing of a spatial axis")
            touched = True
            e = g.est[k]
            size[k] = max(en_n - st_n, 0)
            rf_start[k] += st_n * g.stride[k]
            dense_end = dense_size[k] if en_n >= n_in else min(e * en_n, dense_size[k])
            dense_size[k] = max(dense_end - e * st_n, 0)
        if touched and g.is_dense:
            node.meta[PLAN] = ScalePlan(tuple(g.est[g.axes.index(a)] if a in g.axes else 1 for a in range(rank)))
        return [g.replace(size=tuple(size), dense_size=tuple(dense_size), rf_start=tuple(rf_start))]

    def shift_origin(self, g: Grid, begin: dict[int, int]) -> Grid:
        """A zero Pad of a tensor whose layout is not known yet (Keras' ZeroPadding2D before the
        first Conv): the receptive field starts ``begin`` pixels before the input. A crop of
        the raw input keeps measuring from the crop, whose edge is where padding begins."""
        if g.perm is None or not any(b > 0 for b in begin.values()):
            return g
        origin = list(g.origin if g.origin is not None else (0,) * len(g.perm))
        for a, b in begin.items():
            origin[g.perm[a]] -= max(b, 0)
        return g.replace(origin=tuple(origin))
