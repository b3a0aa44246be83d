"""Upsampling: Resize, Upsample, DepthToSpace and strided ConvTranspose.

The factor is the ratio of sizes (a ConvTranspose's: its stride; a crop may follow). Allowed
only where e = 1 under dilate (two dense phases would claim one output position);
under fragments an upsampling by u leaves e/u (or 1 when u is a multiple of e; anything else
is refused). No plan: dilate leaves the node alone, fragments collapses phases
(passes/analysis/phases.py). A Resize of a 1x1 map of global context is a broadcast
(passes/analysis/global_context.py).
"""

from __future__ import annotations

import math

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
        # Output j reads input indices j/u + lo .. j/u + hi (read_span): its receptive field is
        # theirs, which puts the field where the op puts its output (a transposed kernel's pads,
        # a Resize's coordinate mode) and keeps it conservative for margins.
        spans = read_span(node, g.size, size)
        starts = tuple(math.floor(S * lo) for S, (lo, _) in zip(g.stride, spans))
        ends = tuple(math.ceil(S * hi) for S, (_, hi) in zip(g.stride, spans))
        rf_size = tuple(r + b - a for r, a, b in zip(g.rf_size, starts, ends))
        rf_start = tuple(st + a for st, a in zip(g.rf_start, starts))
        est = g.est
        if g.is_dense:  # fragments: phases whose shift is now a whole step coincide (passes/fragments.py)
            est = _upsampled_est(node, g.est, tuple(S // s for S, s in zip(g.stride, stride)))
        return [
            g.replace(
                stride=tuple(stride), est=est, size=size, dense_size=tuple(s * e for s, e in zip(size, est)),
                rf_size=rf_size, rf_start=rf_start,
            )
        ]


def read_span(node: ir.Node, sizes_in: tuple[int, ...], sizes_out: tuple[int, ...]) -> list[tuple[float, float]]:
    """Per spatial axis, the input indices output ``j`` reads, as offsets ``(lo, hi)`` from ``j/u``.

    ConvTranspose: ``j = i*u - pad + t*d`` for taps ``t < k``, so ``i`` spans
    ``(j + pad - (k-1)d)/u .. (j + pad)/u``. DepthToSpace: ``i = floor(j/u)``. Resize and
    Upsample: every output position's sampling point (its coordinate mode, at these sizes)
    and the taps with a nonzero weight there (nearest: the one its nearest_mode picks), without
    the border clamp, which only shortens the field.
    """
    if node.op_type == "ConvTranspose":
        p = _ir.window_params(node)
        return [((pb - (k - 1) * d) / u, pb / u) for pb, k, d, u in zip(p.pads_begin, p.kernel, p.dilations, p.strides)]
    if node.op_type == "DepthToSpace":
        u = node.attributes.get_int("blocksize", 1)
        return [(-(u - 1) / u, 0.0) for _ in sizes_in]
    if node.op_type == "Upsample":  # opset 7-9: asymmetric coordinates, nearest rounds down
        mode, coordinates, nearest = node.attributes.get_string("mode", "nearest"), "asymmetric", "floor"
    else:
        mode = node.attributes.get_string("mode", "nearest")
        coordinates = node.attributes.get_string("coordinate_transformation_mode", "half_pixel")
        nearest = node.attributes.get_string("nearest_mode", "round_prefer_floor")
    return [_resize_span(mode, coordinates, nearest, n_in, n_out) for n_in, n_out in zip(sizes_in, sizes_out)]


def _resize_span(mode: str, coordinates: str, nearest: str, n_in: int, n_out: int) -> tuple[float, float]:
    u = n_out / n_in
    lo, hi = math.inf, -math.inf
    for j in range(n_out):
        if coordinates in ("half_pixel", "half_pixel_symmetric") or (coordinates == "pytorch_half_pixel" and n_out > 1):
            x = (j + 0.5) / u - 0.5
        elif coordinates == "align_corners":
            x = j * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        elif coordinates == "tf_half_pixel_for_nn":
            x = (j + 0.5) / u
        elif coordinates in ("asymmetric", "pytorch_half_pixel"):
            x = j / u
        else:  # tf_crop_and_resize: the region of interest decides; two input steps each side
            x = j / u
            lo, hi = min(lo, -2.0), max(hi, 2.0)
        f = math.floor(x)
        if mode == "nearest":
            picked = {"round_prefer_ceil": math.floor(x + 0.5), "floor": f, "ceil": math.ceil(x)}.get(
                nearest, math.ceil(x - 0.5)
            )
            taps = (picked, picked)
        elif x == f:
            taps = (f, f)
        else:
            taps = (f, f + 1) if mode == "linear" else (f - 1, f + 2)
        lo, hi = min(lo, taps[0] - j / u), max(hi, taps[1] - j / u)
    return lo, hi


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
