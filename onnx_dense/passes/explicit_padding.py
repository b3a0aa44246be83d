"""Normalise: padding said explicitly, so that scaling it by eST is all the rewrite does.

Rules:
* ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID on Conv and pooling nodes becomes explicit
  ``pads`` computed at the static input size (ORT leaves dilation out of SAME pooling pads,
  so SAME cannot survive into a dilated model).
* ``ceil_mode=1`` pooling becomes ``ceil_mode=0`` with ``min(s - 1, k_eff - 1 - pe)`` more end
  padding, a value that does not depend on the input size (``_ceil_extra_end``): the
  floor-mode pool then has ceil_mode's window count at every length, so every phase of the
  dense model keeps its partial last window. The output size follows ONNX Runtime and PyTorch, which drop a last window that
  would start in the end padding (ONNX shape inference keeps it). Max pooling pads with -inf, so this is exact. Average pooling must not count that
  extra padding: with ``count_include_pad=0`` it already does not; with
  ``count_include_pad=1`` and no pads the flag is switched off (nothing else to count);
  with ``count_include_pad=1`` and pads, the counted pads move into a zero Pad node.
* The pads of a Pad node this pass adds hold -0.0, not 0.0: ORT's Pad_Fusion folds a
  Pad whose value is all-zero bytes into a following pool regardless of
  count_include_pad, which would change the result. -0.0 sums exactly like 0.0.
* Nothing else of the graph changes.
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_dense.errors import UnsupportedNodeError
from onnx_dense.passes import _ir

_POOLS = ("MaxPool", "AveragePool", "LpPool")


class ExplicitAutoPad(ir.passes.InPlacePass):
    """auto_pad -> explicit pads at the static input size."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.op_type not in ("Conv", "MaxPool", "AveragePool", "LpPool") or node.domain not in ("", "ai.onnx"):
                continue
            mode = node.attributes.get_string("auto_pad", "NOTSET")
            if mode in ("NOTSET", ""):
                continue
            params = _ir.window_params(node)
            n = len(params.kernel)
            if mode == "VALID":
                begin = end = (0,) * n
            elif mode in ("SAME_UPPER", "SAME_LOWER"):
                dims = _ir.require_static(node.inputs[0], "input", node)
                sizes = dims[-n:]
                begin_l, end_l = [], []
                for size, k, s, d in zip(sizes, params.kernel, params.strides, params.dilations):
                    out = -(-size // s)
                    total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
                    small, big = total // 2, total - total // 2
                    begin_l.append(small if mode == "SAME_UPPER" else big)
                    end_l.append(big if mode == "SAME_UPPER" else small)
                begin, end = tuple(begin_l), tuple(end_l)
            else:
                raise UnsupportedNodeError(node, f"unknown auto_pad '{mode}'", "fix the model")
            _ir.set_ints(node, "pads", begin + end)
            node.attributes.pop("auto_pad")
            modified = True
        return ir.passes.PassResult(model, modified)


class ExplicitCeilMode(ir.passes.InPlacePass):
    """ceil_mode=1 -> explicit end pads computed from the inferred output size."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        graph = model.graph
        editor = _ir.Editor(graph)
        for node in list(graph):
            if node.op_type not in _POOLS or node.attributes.get_int("ceil_mode", 0) == 0:
                continue
            params = _ir.window_params(node)
            n = len(params.kernel)
            extra = tuple(
                _ceil_extra_end(ek, s, pe)
                for ek, s, pe in zip(params.effective_kernel, params.strides, params.pads_end)
            )
            node.attributes.pop("ceil_mode")
            modified = True
            if not any(extra):
                continue
            pads_end = tuple(p + x for p, x in zip(params.pads_end, extra))
            counted = node.op_type == "AveragePool" and node.attributes.get_int("count_include_pad", 0) == 1
            if counted and any(params.pads_begin + params.pads_end):
                lead = [0] * (node.inputs[0].shape.rank() - n)
                nodes: list[ir.Node] = []
                padded = editor.pad(
                    nodes, node.inputs[0], lead + list(params.pads_begin), lead + list(params.pads_end),
                    base=f"{node.name or 'AveragePool'}_pad", value=-0.0, dtype=_ir.numpy_dtype(node.inputs[0]),
                )
                graph.insert_before(node, nodes)
                node.replace_input_with(0, padded)
                _ir.set_ints(node, "pads", (0,) * n + extra)
            else:
                _ir.set_ints(node, "pads", params.pads_begin + pads_end)
            if counted:
                _ir.set_int(node, "count_include_pad", 0)
        return ir.passes.PassResult(model, modified)


def _ceil_extra_end(kernel: int, stride: int, pad_end: int) -> int:
    """End padding that makes a floor-mode pool count ceil_mode's windows at EVERY input length.

    With P = pad_end + x the floor count is floor((L + pb + P - k) / s) + 1. x = s - 1 turns
    it into ceil((L + pb + pe - k) / s) + 1, ceil_mode's count; x = k - 1 - pe makes it the
    number of window starts before L + pb, the rule of ONNX Runtime and PyTorch that drops a
    last window starting in the end padding. The smaller of the two is both rules at once.
    Being independent of L, it also gives every phase of the dense model (an input shorter by
    the phase offset) its partial last window, scaled by eST like any pad.
    """
    return max(min(stride - 1, kernel - 1 - pad_end), 0)
