"""Rewrite: Conv and pooling windows read the dense grid (the paper's eConv and ePool).

Rules, for each node with a :class:`SpatialPlan` that changes something:

* strides become the kept strides s'; dilations d*e; pads p*e (e: eST at the node's input).
* Conv / ConvTranspose: nothing more.
* MaxPool whose scaled pads (or the end pads ceil_mode became) reach the kernel size (ORT refuses pads >= kernel, torch
  pads > kernel/2): the pads move into a Pad node whose value is the dtype's lowest finite
  number; MaxPool reads unpadded. ORT's Pad_Fusion only folds zero pads, so it stays.
* AveragePool: at opset >= 19 with legal pads, a dilated AveragePool. Otherwise (no
  ``dilations`` before opset 19, or pads too large) a depthwise Conv with weights 1/K;
  with ``count_include_pad=0`` and pads, the window sum is divided by a count map, the
  same window summed over ones, so border windows average only real pixels.
* LpPool: dilated at opset >= 18 with legal pads; refused otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnx_dense.errors import UnsupportedNodeError
from onnx_dense.passes import _ir
from onnx_dense.passes.plans import SpatialPlan

INT64_MAX = np.iinfo(np.int64).max


class DensifyWindows(ir.passes.InPlacePass):
    """Apply every SpatialPlan: eConv and ePool."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = _ir.opset(model)
        editor = _ir.Editor(graph)
        modified = False
        for node, plan in _ir.planned(graph, SpatialPlan):
            legal = all(p < k for p, k in zip(plan.pads_begin + plan.pads_end, plan.params.kernel * 2))
            if not plan.changes and (legal or node.op_type == "Conv"):
                continue  # pools whose normalised pads reach the kernel are made legal below
            modified = True
            if node.op_type == "AveragePool" and (opset < 19 or not legal):
                _average_as_conv(graph, editor, node, plan)
                continue
            if node.op_type == "LpPool" and not legal:
                raise UnsupportedNodeError(node, "LpPool whose dense pads reach its kernel size")
            if node.op_type == "MaxPool" and not legal:
                _move_pads_out(graph, editor, node, plan)
                _set_window(node, plan, pads=False)
                continue
            _set_window(node, plan, pads=True)
        return ir.passes.PassResult(model, modified)


def _set_window(node: ir.Node, plan: SpatialPlan, *, pads: bool) -> None:
    n = len(plan.kept)
    _ir.set_ints(node, "strides", plan.kept)
    _ir.set_ints(node, "dilations", plan.dilations)
    _ir.set_ints(node, "pads", plan.pads_begin + plan.pads_end if pads else (0,) * (2 * n))
    if "kernel_shape" not in node.attributes and node.op_type != "Conv":
        _ir.set_ints(node, "kernel_shape", plan.params.kernel)


def _move_pads_out(graph: ir.Graph, editor: _ir.Editor, node: ir.Node, plan: SpatialPlan) -> None:
    x = node.inputs[0]
    dtype = _ir.numpy_dtype(x)
    lowest = np.finfo(dtype).min if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min
    nodes: list[ir.Node] = []
    padded = editor.pad(
        nodes, x, (0, 0, *plan.pads_begin), (0, 0, *plan.pads_end), base=f"{node.name or 'MaxPool'}_pad",
        value=lowest, dtype=dtype,
    )
    graph.insert_before(node, nodes)
    node.replace_input_with(0, padded)


def _average_as_conv(graph: ir.Graph, editor: _ir.Editor, node: ir.Node, plan: SpatialPlan) -> None:
    """AveragePool -> depthwise Conv (and a count map when padding is not counted)."""
    x = node.inputs[0]
    dims = _ir.require_static(x, "input", node)
    channels = int(dims[1])
    kernel = plan.params.kernel
    dtype = _ir.numpy_dtype(x)
    base = node.name or "AveragePool"
    counted = node.attributes.get_int("count_include_pad", 0) == 1
    needs_count = not counted and any(plan.params.pads_begin + plan.params.pads_end)
    window = {
        "strides": list(plan.kept),
        "dilations": list(plan.dilations),
        "pads": list(plan.pads_begin + plan.pads_end),
        "kernel_shape": list(kernel),
    }
    nodes: list[ir.Node] = []
    fill = 1.0 if needs_count else 1.0 / math.prod(kernel)
    weight = editor.const(nodes, np.full((channels, 1, *kernel), fill, dtype=dtype), base=f"{base}_weight")
    summed = editor.op(nodes, "Conv", [x, weight], {**window, "group": channels}, base=f"{base}_conv")
    if needs_count:
        shape = editor.op(nodes, "Shape", [x], base=f"{base}_shape")
        start = editor.const(nodes, np.array([2], dtype=np.int64), base=f"{base}_two")
        end = editor.const(nodes, np.array([INT64_MAX], dtype=np.int64), base=f"{base}_end")
        spatial = editor.op(nodes, "Slice", [shape, start, end], base=f"{base}_spatial")
        ones11 = editor.const(nodes, np.array([1, 1], dtype=np.int64), base=f"{base}_ones11")
        ones_shape = editor.op(nodes, "Concat", [ones11, spatial], {"axis": 0}, base=f"{base}_ones_shape")
        one = ir.tensor(np.array([1.0], dtype=dtype), name=f"{base}_one")
        ones = editor.op(nodes, "ConstantOfShape", [ones_shape], {"value": one}, base=f"{base}_ones")
        unit = editor.const(nodes, np.ones((1, 1, *kernel), dtype=dtype), base=f"{base}_unit")
        count = editor.op(nodes, "Conv", [ones, unit], window, base=f"{base}_count")
        summed = editor.op(nodes, "Div", [summed, count], base=f"{base}_mean")
    graph.insert_before(node, nodes)
    _ir.replace_value(node.outputs[0], summed)
    graph.remove(node, safe=True)
