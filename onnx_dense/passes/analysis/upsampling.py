"""Upsampling: Resize, Upsample, DepthToSpace and strided ConvTranspose.

The factor is the ratio of sizes (a ConvTranspose's: its stride; a crop may follow). Allowed
only where e = 1 under dilate (two dense phases would claim one output position);
under fragments an upsampling by u leaves e/u (or 1 when u is a multiple of e; anything else
is refused). No plan: dilate leaves the node alone, fragments collapses phases
(passes/analysis/phases.py). A Resize of a 1x1 map of global context is a broadcast
(passes/analysis/global_context.py).
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_dense.errors import UnsupportedNodeError
from onnx_dense.grid import fmt
from onnx_dense.passes import _ir
from onnx_dense.passes.analysis.base import Rules
from onnx_dense.passes.plans import UPSAMPLING


class UpsamplingRules(Rules):
    OPS = {op: "upsample" for op in UPSAMPLING}

    def upsample(self, node: ir.Node, grids):
        g = next(gr for gr in grids if gr is not None)
        if g.axes is None:
            raise UnsupportedNodeError(node, "upsampling the raw input is not supported", "fix the model")
        self.check_plain(node, g)
        if node.op_type in ("Resize", "Upsample") and g.global_from and all(s == 1 for s in g.size):
            return [self.broadcast_context(node, g)]
        if g.is_dense and not self.fragments:
            raise UnsupportedNodeError(
                node,
                f"upsamples at eST {fmt(g.est)}: two dense phases would claim the same output position, so there is no "
                "single-tensor dense equivalent",
                "rewrite with --strategy fragments, cut before it with --outputs, or choose an output stride at which "
                "it stays at eST 1",
            )
        if node.op_type == "DepthToSpace":
            block = node.attributes.get_int("blocksize", 1)
            size = tuple(s * block for s in g.size)
        else:
            size = self.out_size(node, g)
        if node.op_type == "ConvTranspose":  # (a - 1) s + k - pads: the factor is the stride, a crop may follow
            strides = _ir.window_params(node).strides
            stride = []
            for S, u in zip(g.stride, strides):
                if S % u:
                    raise UnsupportedNodeError(
                        node, f"upsamples by {u}, not a factor of the stride {fmt(g.stride)}", "fix the model"
                    )
                stride.append(S // u)
            return self._upsampled(node, g, size, stride)
        stride = []
        for S, a, b in zip(g.stride, g.size, size):
            if b % a or S % (b // a):
                raise UnsupportedNodeError(
                    node, f"scales {fmt(g.size)} to {fmt(size)}, not an integer factor of the stride {fmt(g.stride)}",
                    "fix the model",
                )
            stride.append(S // (b // a))
        return self._upsampled(node, g, size, stride)

    def _upsampled(self, node: ir.Node, g, size, stride):
        # Interpolation and transposed kernels read neighbours: widen the field by one input step
        # each side (conservative: margins built from it stay exact).
        rf_size = tuple(r + 2 * S for r, S in zip(g.rf_size, g.stride))
        rf_start = tuple(st - S for st, S in zip(g.rf_start, g.stride))
        est = g.est
        if g.is_dense:  # fragments: phases whose shift is now a whole step coincide (passes/fragments.py)
            est = _upsampled_est(node, g.est, tuple(S // s for S, s in zip(g.stride, stride)))
        return [
            g.replace(
                stride=tuple(stride), est=est, size=size, dense_size=tuple(s * e for s, e in zip(size, est)),
                rf_size=rf_size, rf_start=rf_start,
            )
        ]


def _upsampled_est(node: ir.Node, est: tuple[int, ...], factor: tuple[int, ...]) -> tuple[int, ...]:
    """eST after upsampling by ``factor`` under fragments: the phases of the last removed
    strides now differ by whole output steps and collapse into one (passes/fragments.py)."""
    out = []
    for e, u in zip(est, factor):
        if e % u == 0:
            out.append(e // u)
        elif u % e == 0:
            out.append(1)
        else:
            raise UnsupportedNodeError(
                node, f"upsamples by {u} at eST {e}: the phases of the removed strides would overlap unevenly",
                "choose an output stride whose eST here is a multiple or a divisor of the upsampling factor",
            )
    return tuple(out)
