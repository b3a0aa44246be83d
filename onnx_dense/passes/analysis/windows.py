"""Windows: Conv, ConvTranspose, MaxPool, AveragePool, LpPool and SpaceToDepth.

A window with stride s keeps s' = gcd(s, R/D) while e = 1 and removes the rest; it reads its
input with dilation d*e and pads p*e; afterwards S *= s and e *= s/s'. The plan
(SpatialPlan) is applied by passes/densify_windows.py (dilate) or passes/fragments.py.
A window over more axes than the image has (torch's LocalResponseNorm) keeps its window on
the other axes. SpaceToDepth is strided but has no dense form: refused wherever it would be.
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_dense.errors import UnsupportedNodeError
from onnx_dense.grid import PLAN, Grid, split_stride
from onnx_dense.passes import _ir
from onnx_dense.passes.analysis.base import Rules, used
from onnx_dense.passes.plans import SpatialPlan


class WindowRules(Rules):
    OPS = {**{op: "spatial" for op in _ir.SPATIAL_OPS}, "SpaceToDepth": "space_to_depth"}

    def spatial(self, node: ir.Node, grids):
        x = node.inputs[0]
        g = grids[0]
        if g is None or any(gr is not None for gr in grids[1:]):
            raise UnsupportedNodeError(node, "weights computed from the image are not supported", "fix the model")
        self.check_plain(node, g)
        if g.inserted:
            raise UnsupportedNodeError(node, "spatial op after a flattening head", "fix the model")
        params = _ir.window_params(node)
        n = len(params.kernel)
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", ""):
            raise UnsupportedNodeError(node, "auto_pad left after normalisation", "report this as a bug")
        if g.axes is not None and g.rank < n:
            return self.window_beyond_grid(node, g, params)
        g = self.establish(node, g, x, n)
        if node.op_type == "ConvTranspose":
            return [self.conv_transpose(node, g, params)]
        if node.op_type == "LpPool" and self.opset < 18 and g.is_dense:
            raise UnsupportedNodeError(node, "LpPool has no dilations before opset 18", "re-export with opset >= 18")
        if node.op_type == "MaxPool" and len(node.outputs) > 1 and used(node.outputs[1]) and g.is_dense:
            raise UnsupportedNodeError(node, "MaxPool indices of a dense pool index a different tensor")
        target = self.target_for(n, node)
        if target is None:
            kept = params.strides
        else:
            kept = tuple(
                split_stride(s, d, r, e) for s, d, r, e in zip(params.strides, g.dense_stride, target, g.est)
            )
        node.meta[PLAN] = SpatialPlan(params, g.est, kept)
        out = self.window_grid(node, g, params, kept)
        results = [out]
        if len(node.outputs) > 1:
            results.append(None)
        return results

    def window_grid(self, node: ir.Node, g: Grid, params: _ir.WindowParams, kept: tuple[int, ...]) -> Grid:
        """The grid after a window whose axes are exactly the grid's (``params`` in grid order)."""
        est = tuple(e * s // k for e, s, k in zip(g.est, params.strides, kept))
        stride = tuple(S * s for S, s in zip(g.stride, params.strides))
        rf_size = tuple(r + (ek - 1) * S for r, ek, S in zip(g.rf_size, params.effective_kernel, g.stride))
        rf_start = tuple(st - pb * S for st, pb, S in zip(g.rf_start, params.pads_begin, g.stride))
        dense_size = tuple(
            (L + e * (pb + pe) - e * (ek - 1) - 1) // k + 1
            for L, e, pb, pe, ek, k in zip(
                g.dense_size, g.est, params.pads_begin, params.pads_end, params.effective_kernel, kept
            )
        )
        size = self.out_size(node, g)
        # A window over a 1x1 map of global context (the 1x1 Convs of a squeeze-and-excitation
        # block) still carries nothing but that context.
        still_global = g.global_from if all(s == 1 for s in g.size + size) else ()
        return g.replace(
            stride=stride, est=est, size=size, dense_size=dense_size, rf_size=rf_size,
            rf_start=rf_start, global_from=still_global,
        )

    def window_beyond_grid(self, node: ir.Node, g: Grid, params: _ir.WindowParams):
        """A window over more axes than the image has, e.g. torch's LocalResponseNorm: an
        AveragePool3d over (channel, H, W) with kernel (size, 1, 1). Axes that are not image
        axes keep their window as it is; the image axes follow the usual rule."""
        if node.op_type not in ("MaxPool", "AveragePool", "LpPool", "Conv"):
            raise UnsupportedNodeError(node, f"works on {len(params.kernel)} axes but the image has {g.rank}")
        rank = self.rank_of(node, node.inputs[0])
        n = len(params.kernel)
        window_axes = tuple(range(rank - n, rank))
        if not set(g.axes) <= set(window_axes):
            raise UnsupportedNodeError(
                node, f"its window axes {list(window_axes)} do not cover the image axes {list(g.axes)}", "fix the model"
            )
        sel = [window_axes.index(a) for a in g.axes]

        def pick(values):
            return tuple(values[i] for i in sel)

        def spread(values, fill):
            out = list(fill)
            for i, v in zip(sel, values):
                out[i] = v
            return tuple(out)

        sub = _ir.WindowParams(
            pick(params.kernel), pick(params.strides), pick(params.dilations), pick(params.pads_begin),
            pick(params.pads_end),
        )
        target = self.target_for(g.rank, node)
        kept = sub.strides if target is None else tuple(
            split_stride(s, d, r, e) for s, d, r, e in zip(sub.strides, g.dense_stride, target, g.est)
        )
        if node.op_type == "LpPool" and self.opset < 18 and g.is_dense:
            raise UnsupportedNodeError(node, "LpPool has no dilations before opset 18", "re-export with opset >= 18")
        node.meta[PLAN] = SpatialPlan(params, spread(g.est, (1,) * n), spread(kept, params.strides))
        results = [self.window_grid(node, g, sub, kept)]
        return results + [None] * (len(node.outputs) - 1)

    def conv_transpose(self, node: ir.Node, g: Grid, params: _ir.WindowParams) -> Grid:
        if any(s > 1 for s in params.strides):
            return self.upsample(node, [g])[0]
        if g.is_dense and (node.attributes.get_ints("output_padding") or node.attributes.get_ints("output_shape")):
            raise UnsupportedNodeError(node, "ConvTranspose with output_padding/output_shape in the dense region")
        node.meta[PLAN] = SpatialPlan(params, g.est, params.strides)
        ek = params.effective_kernel
        rf_size = tuple(r + (k - 1) * S for r, k, S in zip(g.rf_size, ek, g.stride))
        rf_start = tuple(st - (k - 1 - pb) * S for st, k, pb, S in zip(g.rf_start, ek, params.pads_begin, g.stride))
        dense_size = tuple(
            L + e * (k - 1) - e * (pb + pe)
            for L, e, k, pb, pe in zip(g.dense_size, g.est, ek, params.pads_begin, params.pads_end)
        )
        return g.replace(size=self.out_size(node, g), dense_size=dense_size, rf_size=rf_size, rf_start=rf_start)

    def space_to_depth(self, node: ir.Node, grids):
        g = grids[0]
        if g.axes is None:
            g = self.establish(node, g, node.inputs[0], g.perm and len(g.perm) - 2 or 2)
        block = node.attributes.get_int("blocksize", 1)
        target = self.target_for(g.rank, node)
        if g.is_dense or (
            target is not None
            and any(split_stride(block, d, r, e) != block for d, r, e in zip(g.dense_stride, target, g.est))
        ):
            raise UnsupportedNodeError(
                node, "SpaceToDepth is a strided op that cannot be made dense", "choose an output stride it keeps"
            )
        size = tuple(s // block for s in g.size)
        rf_size = tuple(r + (block - 1) * S for r, S in zip(g.rf_size, g.stride))
        return [
            g.replace(
                stride=tuple(S * block for S in g.stride), size=size, dense_size=size, rf_size=rf_size, global_from=()
            )
        ]
