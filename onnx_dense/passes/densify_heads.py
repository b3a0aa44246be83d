"""Rewrite: classifier heads become sliding windows over the dense grid.

Rules:

* Global pooling in a head (:class:`GlobalPlan`) becomes AveragePool/MaxPool with the
  original's coarse map size as kernel, dilated by eST, stride 1, no pads. Below opset 19
  AveragePool has no dilations, so a dilated average is a depthwise Conv with weights 1/K.
  Reductions over NHWC-laid-out axes are transposed to NCHW around the pool.
* Flatten/Reshape/Squeeze of a 1x1 map (:class:`FlattenPlan`, not pending) becomes a
  Transpose that moves the dense positions right after the batch axis ("inserted"
  layout), so everything downstream that works on the last (feature) axis still does.
* Flatten of a larger map (pending) disappears: its consumer sees the map itself, and the
  Gemm/MatMul reading it (:class:`HeadConvPlan`) becomes a Conv whose kernel is the
  original map, dilated by eST. The weight keeps its name and shape: Transpose/Reshape
  nodes turn it into a kernel at run time, so trained weights map back one to one.
* On inserted tensors (:class:`VectorPlan`) Gemm becomes MatMul (+ bias), and axis
  attributes move past the inserted spatial axes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnx_dense.passes import _ir
from onnx_dense.passes.plans import FlattenPlan, GlobalPlan, HeadConvPlan, VectorPlan


class DensifyGlobalPools(ir.passes.InPlacePass):
    """Global pools in heads -> windows of the original map size, dilated by eST."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = _ir.opset(model)
        editor = _ir.Editor(graph)
        modified = False
        for node, plan in _ir.planned(graph, GlobalPlan):
            nodes: list[ir.Node] = []
            base = node.name or node.op_type
            x = node.inputs[0]
            rank = x.shape.rank()
            n = len(plan.kernel)
            channel_axes = [a for a in range(1, rank) if a not in plan.spatial_axes]
            to_nc = (0, *channel_axes, *plan.spatial_axes)
            if len(channel_axes) != 1:
                raise _unsupported(node, "global pooling over a tensor with several channel axes")
            if to_nc != tuple(range(rank)):
                x = editor.op(nodes, "Transpose", [x], {"perm": list(to_nc)}, base=f"{base}_to_nchw")
            channels = int(node.inputs[0].shape.dims[channel_axes[0]])
            y = _window(editor, nodes, x, plan, channels, opset, base, _ir.numpy_dtype(node.inputs[0]))
            if not plan.keepdims:
                y = editor.op(nodes, "Transpose", [y], {"perm": [0, *range(2, 2 + n), 1]}, base=f"{base}_channels_last")
            elif to_nc != tuple(range(rank)):
                inverse = [to_nc.index(a) for a in range(rank)]
                y = editor.op(nodes, "Transpose", [y], {"perm": inverse}, base=f"{base}_from_nchw")
            graph.insert_before(node, nodes)
            _ir.replace_value(node.outputs[0], y)
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)


def _window(editor, nodes, x, plan: GlobalPlan, channels: int, opset: int, base: str, dtype) -> ir.Value:
    n = len(plan.kernel)
    window = {"kernel_shape": list(plan.kernel), "strides": [1] * n, "pads": [0] * (2 * n)}
    dilated = any(e > 1 for e in plan.est)
    if plan.kind == "max":
        attrs = {**window, "dilations": list(plan.est)} if dilated else window
        return editor.op(nodes, "MaxPool", [x], attrs, base=f"{base}_window")
    if not dilated:
        return editor.op(nodes, "AveragePool", [x], window, base=f"{base}_window")
    if opset >= 19:
        return editor.op(nodes, "AveragePool", [x], {**window, "dilations": list(plan.est)}, base=f"{base}_window")
    weight = editor.const(
        nodes, np.full((channels, 1, *plan.kernel), 1.0 / math.prod(plan.kernel), dtype=dtype), base=f"{base}_weight"
    )
    attrs = {**window, "dilations": list(plan.est), "group": channels}
    return editor.op(nodes, "Conv", [x, weight], attrs, base=f"{base}_window")


class DensifyFlattens(ir.passes.InPlacePass):
    """Flatten-like nodes -> channels-last Transpose (1x1 maps) or nothing (before a head Conv)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        editor = _ir.Editor(graph)
        modified = False
        for node, plan in _ir.planned(graph, VectorPlan, FlattenPlan):
            if isinstance(plan, VectorPlan):
                if plan.kind != "identity" or node.op_type not in ("Flatten", "Reshape"):
                    continue
                _ir.replace_value(node.outputs[0], node.inputs[0])
                graph.remove(node, safe=True)
                modified = True
                continue
            modified = True
            x = node.inputs[0]
            if plan.pending:
                _ir.replace_value(node.outputs[0], x)
                graph.remove(node, safe=True)
                continue
            nodes: list[ir.Node] = []
            base = node.name or node.op_type
            y = x
            if plan.perm != tuple(range(len(plan.perm))):
                y = editor.op(nodes, "Transpose", [x], {"perm": list(plan.perm)}, base=f"{base}_channels_last")
            if plan.merge_features:
                n_keep = len(plan.perm) - _n_features(node, plan)
                shape = editor.const(nodes, np.array([0] * n_keep + [-1], dtype=np.int64), base=f"{base}_shape")
                y = editor.op(nodes, "Reshape", [y, shape], base=f"{base}_merge")
            if y is x:
                y = editor.op(nodes, "Identity", [x], base=base)
            graph.insert_before(node, nodes)
            _ir.replace_value(node.outputs[0], y)
            graph.remove(node, safe=True)
        return ir.passes.PassResult(model, modified)


def _n_features(node: ir.Node, plan: FlattenPlan) -> int:
    from onnx_dense.grid import GRID

    g = node.inputs[0].meta[GRID]
    return len(plan.perm) - 1 - g.rank


class DensifyFullyConnected(ir.passes.InPlacePass):
    """Gemm/MatMul in heads: on a flattened map -> Conv; on position vectors -> MatMul."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        editor = _ir.Editor(graph)
        modified = False
        for node, plan in _ir.planned(graph, HeadConvPlan, VectorPlan):
            if isinstance(plan, HeadConvPlan):
                _head_conv(graph, editor, node, plan)
                modified = True
            elif isinstance(plan, VectorPlan) and plan.kind == "gemm":
                _gemm_to_matmul(graph, editor, node)
                modified = True
        return ir.passes.PassResult(model, modified)


def _weight_as_kn(editor, nodes, node: ir.Node, base: str) -> ir.Value:
    """The fully connected weight as (K, N), whatever Gemm/MatMul flags say, scaled by alpha."""
    w = node.inputs[1]
    if node.op_type == "Gemm":
        if node.attributes.get_int("transB", 0):
            w = editor.op(nodes, "Transpose", [w], {"perm": [1, 0]}, base=f"{base}_weight_t")
        alpha = node.attributes.get_float("alpha", 1.0)
        if alpha != 1.0:
            a = editor.const(nodes, np.array(alpha, dtype=_ir.numpy_dtype(node.inputs[1])), base=f"{base}_alpha")
            w = editor.op(nodes, "Mul", [w, a], base=f"{base}_weight_alpha")
    return w


def _bias(editor, nodes, node: ir.Node, y: ir.Value, base: str) -> ir.Value:
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return y
    c = node.inputs[2]
    beta = node.attributes.get_float("beta", 1.0)
    if beta != 1.0:
        b = editor.const(nodes, np.array(beta, dtype=_ir.numpy_dtype(c)), base=f"{base}_beta")
        c = editor.op(nodes, "Mul", [c, b], base=f"{base}_bias_beta")
    return editor.op(nodes, "Add", [y, c], base=f"{base}_bias")


def _gemm_to_matmul(graph: ir.Graph, editor: _ir.Editor, node: ir.Node) -> None:
    nodes: list[ir.Node] = []
    base = node.name or "Gemm"
    w = _weight_as_kn(editor, nodes, node, base)
    y = editor.op(nodes, "MatMul", [node.inputs[0], w], base=f"{base}_matmul")
    y = _bias(editor, nodes, node, y, base)
    graph.insert_before(node, nodes)
    _ir.replace_value(node.outputs[0], y)
    graph.remove(node, safe=True)


def _head_conv(graph: ir.Graph, editor: _ir.Editor, node: ir.Node, plan: HeadConvPlan) -> None:
    nodes: list[ir.Node] = []
    base = node.name or node.op_type
    x = node.inputs[0]
    rank = len(plan.unflat_shape)
    n = len(plan.spatial_axes)
    to_nc = (0, plan.feature_axis, *plan.spatial_axes)
    if to_nc != tuple(range(rank)):
        x = editor.op(nodes, "Transpose", [x], {"perm": list(to_nc)}, base=f"{base}_to_nchw")
    w = _weight_as_kn(editor, nodes, node, base)
    w = editor.op(nodes, "Transpose", [w], {"perm": [1, 0]}, base=f"{base}_weight_nk")
    shape = editor.const(nodes, np.array([-1, *plan.unflat_shape[1:]], dtype=np.int64), base=f"{base}_kernel_shape")
    w = editor.op(nodes, "Reshape", [w, shape], base=f"{base}_kernel")
    kernel_perm = (0, *(a for a in to_nc[1:]))
    if kernel_perm != tuple(range(rank)):
        w = editor.op(nodes, "Transpose", [w], {"perm": list(kernel_perm)}, base=f"{base}_kernel_nchw")
    kernel = [int(plan.unflat_shape[a]) for a in plan.spatial_axes]
    attrs = {
        "kernel_shape": kernel,
        "dilations": list(plan.est),
        "strides": [1] * n,
        "pads": [0] * (2 * n),
    }
    y = editor.op(nodes, "Conv", [x, w], attrs, base=f"{base}_conv")
    y = editor.op(nodes, "Transpose", [y], {"perm": list(plan.to_channels_last)}, base=f"{base}_channels_last")
    y = _bias(editor, nodes, node, y, base)
    graph.insert_before(node, nodes)
    _ir.replace_value(node.outputs[0], y)
    graph.remove(node, safe=True)


class RemapHeadAxes(ir.passes.InPlacePass):
    """Axis attributes of ops on inserted (head) tensors skip the inserted spatial axes."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        editor = _ir.Editor(graph)
        modified = False
        for node, plan in _ir.planned(graph, VectorPlan):
            if plan.kind == "axis":
                _ir.set_int(node, "axis", plan.axis)
                modified = True
            elif plan.kind == "axes":
                _remap_axes(graph, editor, node, plan.n_spatial)
                modified = True
        return ir.passes.PassResult(model, modified)


def _remap_axes(graph: ir.Graph, editor: _ir.Editor, node: ir.Node, n: int) -> None:
    rank = node.inputs[0].shape.rank()

    def shift(axes):
        return [(_ir.normalise_axis(int(a), rank) + n) for a in axes]

    if "axes" in node.attributes:
        _ir.set_ints(node, "axes", shift(node.attributes.get_ints("axes")))
        return
    index = 3 if node.op_type == "Slice" else 1
    nodes: list[ir.Node] = []
    if len(node.inputs) > index and node.inputs[index] is not None:
        axes = _ir.const_array(node.inputs[index]).reshape(-1)
    elif node.op_type == "Slice":
        axes = np.arange(len(_ir.const_array(node.inputs[1]).reshape(-1)))
    else:  # reduce over all axes of the original: all but batch and the inserted ones
        axes = np.arange(rank)
    new = editor.const(nodes, np.array(shift(axes), dtype=np.int64), base=f"{node.name or node.op_type}_axes")
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)
    graph.insert_before(node, nodes)


def _unsupported(node, reason):
    from onnx_dense.errors import UnsupportedNodeError

    return UnsupportedNodeError(node, reason)
