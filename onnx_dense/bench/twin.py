"""A dense model's undilated twin: the same map sizes and FLOPs with no dilation, the reference
benchmarks/gpu_speed.py measures the dense model's TFLOP/s against."""

from __future__ import annotations

import itertools
from typing import Callable, Mapping

import numpy as np
import onnx

from onnx_dense import metadata
from onnx_dense.errors import DenseError
from onnx_dense.bench.flops import _light, _shape_problem

_WINDOW_OPS = ("Conv", "MaxPool", "AveragePool")
_INT64_MAX = 2**63 - 1

def undilated_twin(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A copy of a dense model with every Conv/MaxPool/AveragePool dilation set to 1, at the same map sizes.

    Why: the achieved TFLOP/s of a dense model means little on its own; its twin does the same
    FLOPs on maps of the same size with undilated windows, so dense TFLOP/s over twin TFLOP/s
    is what dilation costs on that machine (benchmarks/gpu_speed.py). Its outputs are not the
    dense model's values, only the same workload.

    Per window and spatial axis, the dilated extent shrinks by ``(d-1)*(k-1)``; the pads shrink
    by as much in total (split between begin and end, never below 0) and, where the pads are
    smaller than that (a dense pool or fc6 with no padding), a Slice crops the window's input by
    the rest, so every output keeps the dense model's size and FLOPs (a Slice counts none; its
    copy is in the twin's time). ``auto_pad=SAME_*`` outputs do not depend on the dilation: only
    the dilation changes. ``input_shapes``: check with ONNX shape inference that the twin runs
    there (one-line DenseError if not). The input proto is not modified.
    """
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    graph = twin.graph
    opset = next((o.version for o in twin.opset_import if o.domain in ("", "ai.onnx")), 0)
    inferred: list[dict] = []

    def weight_shape(name: str) -> tuple | None:
        if not inferred:  # only for a Conv without kernel_shape
            inferred.append(_static_shapes(model))
        return inferred[0].get(name)

    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        attrs = {a.name: a for a in node.attribute}
        dil = list(attrs["dilations"].ints) if "dilations" in attrs else []
        if node.op_type in _WINDOW_OPS and node.domain in ("", "ai.onnx") and any(d > 1 for d in dil):
            crop = _undilate(node, attrs, dil, weight_shape)
            if any(crop):
                if opset < 10:
                    raise DenseError(f"undilated twin: cropping needs Slice with inputs (opset >= 10); the model has opset {opset}")
                nodes.append(_crop_node(graph, node, i, crop))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [p for p in twin.metadata_props if p.key != metadata.KEY]  # its grid is not the dense model's
    del twin.metadata_props[:]
    twin.metadata_props.extend(kept)
    twin.doc_string = "undilated twin (onnx_dense.bench.undilated_twin): a timing workload, not the dense model"
    if input_shapes:
        problem = _shape_problem(twin, input_shapes)
        if problem:
            raise DenseError(f"the undilated twin does not run at {dict(input_shapes)}: {problem}")
    return twin

def _undilate(node: onnx.NodeProto, attrs: dict, dil: list[int], weight_shape: Callable[[str], tuple | None]) -> list[int]:
    """Set the node's dilations to 1 and shrink its pads; returns the input crop (begins, ends) still needed."""
    rank = len(dil)
    label = f"node '{node.name or node.output[0]}' ({node.op_type})"
    if "kernel_shape" in attrs:
        kernel = list(attrs["kernel_shape"].ints)
    else:
        weight = weight_shape(node.input[1]) if len(node.input) > 1 else None
        if weight is None or len(weight) != rank + 2:
            raise DenseError(f"undilated twin: {label} has no kernel_shape and no static weight shape")
        kernel = list(weight[2:])
    auto = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
    attrs["dilations"].ints[:] = [1] * rank
    if auto in ("SAME_UPPER", "SAME_LOWER"):  # output ceil(n / s) whatever the dilation
        return [0] * (2 * rank)
    pads = list(attrs["pads"].ints) if "pads" in attrs and auto != "VALID" else [0] * (2 * rank)
    crop = [0] * (2 * rank)
    for ax in range(rank):
        need = (dil[ax] - 1) * (kernel[ax] - 1)
        begin = min(pads[ax], need // 2)
        end = min(pads[ax + rank], need - begin)
        begin = min(pads[ax], need - end)
        pads[ax] -= begin
        pads[ax + rank] -= end
        rest = need - begin - end
        crop[ax], crop[ax + rank] = rest // 2, rest - rest // 2
    if "pads" in attrs:
        attrs["pads"].ints[:] = pads
    return crop

def _crop_node(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, crop: list[int]) -> onnx.NodeProto:
    """A Slice cropping ``node``'s data input by ``crop`` (begins, ends) on its spatial axes; rewires ``node``."""
    rank = len(crop) // 2
    prefix = f"onnx_dense_twin_{index}_"
    values = {
        "starts": crop[:rank], "ends": [-e if e else _INT64_MAX for e in crop[rank:]], "axes": list(range(2, 2 + rank)),
    }
    for key, value in values.items():
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(value, dtype=np.int64), prefix + key))
    cropped = prefix + "input"
    slice_node = onnx.helper.make_node(
        "Slice", [node.input[0], prefix + "starts", prefix + "ends", prefix + "axes"], [cropped], name=prefix + "crop"
    )
    node.input[0] = cropped
    return slice_node

def _static_shapes(proto: onnx.ModelProto) -> dict[str, tuple]:
    """Static shapes ONNX shape inference finds at the model's own input sizes (weights included)."""
    light = _light(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        inferred = light
    shapes: dict[str, tuple] = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for vi in itertools.chain(inferred.graph.input, inferred.graph.value_info, inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes.setdefault(vi.name, tuple(d.dim_value for d in tt.shape.dim))
    return shapes



