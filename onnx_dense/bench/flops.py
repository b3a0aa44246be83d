"""FLOPs of a graph as run: ONNX shape inference at the benchmark size, multiply-add = 2
(Conv/ConvTranspose, Gemm/MatMul and pooling, as ``inspect`` counts them)."""

from __future__ import annotations

import itertools
import math
from typing import Mapping

import onnx

def count_flops(proto: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, dict[str, int]]:
    """FLOPs of one pass at ``input_shapes`` (total, per node name); total None if a shape is unknown.

    Same convention as ``inspect``: a multiply-add is 2 FLOPs; Conv/ConvTranspose/Gemm/MatMul
    count 2 per weight per output position, pooling one per window element, global pools one
    per input element. Shapes come from ONNX shape inference with data propagation on a copy
    without the weights.
    """
    light = _light(proto)
    _set_input_shapes(light, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        return None, {}
    shapes: dict[str, tuple | None] = {}
    for vi in itertools.chain(inferred.graph.input, inferred.graph.value_info, inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
    for t in proto.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    total, per_node, unknown = 0, {}, False
    for i, node in enumerate(inferred.graph.node):
        flops = _node_flops(node, shapes)
        if flops is None:
            unknown = True
            continue
        if flops:
            per_node[node.name or f"{node.op_type}_{i}"] = flops
            total += flops
    return (None if unknown else total), per_node

def _light(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the graph with large initializers replaced by typed inputs (no weight copied)."""
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "domain", "model_version"):
        setattr(light, field, getattr(proto, field))
    light.opset_import.extend(proto.opset_import)
    g = light.graph
    g.name = proto.graph.name
    g.node.extend(proto.graph.node)
    g.input.extend(proto.graph.input)
    g.output.extend(proto.graph.output)
    present = {vi.name for vi in proto.graph.input}
    for t in proto.graph.initializer:
        small = t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() <= 1024
        if small:
            g.initializer.append(t)
        elif t.name not in present:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light

def _node_flops(node: onnx.NodeProto, shapes: dict) -> int | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return 0
    out = shapes.get(node.output[0]) if node.output else None

    def attr(name, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    if op in ("Conv", "ConvTranspose"):
        w = shapes.get(node.input[1])
        if w is None or out is None:
            return None
        if op == "ConvTranspose":
            x = shapes.get(node.input[0])
            if x is None:
                return None
            return 2 * math.prod(w) * x[0] * math.prod(x[2:])
        return 2 * math.prod(w) * out[0] * math.prod(out[2:])
    if op in ("Gemm", "MatMul"):
        b = shapes.get(node.input[1])
        if b is None or out is None:
            return None
        k = b[-1] if (op == "Gemm" and attr("transB", 0)) else b[-2] if len(b) >= 2 else b[0]
        return 2 * math.prod(out) * k
    if op in ("MaxPool", "AveragePool", "LpPool"):
        if out is None:
            return None
        return math.prod(out) * math.prod(attr("kernel_shape", [1]))
    if op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        x = shapes.get(node.input[0])
        return math.prod(x) if x is not None else None
    return 0

def _shape_problem(proto: onnx.ModelProto, shapes) -> str | None:
    """ONNX shape inference's complaint about running ``proto`` at ``shapes`` (strict), or None."""
    light = _light(proto)
    _set_input_shapes(light, shapes)
    try:
        onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=True, data_prop=True)
    except Exception as exc:
        return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:300]
    return None

def _set_input_shapes(proto: onnx.ModelProto, shapes) -> None:
    for vi in proto.graph.input:
        if vi.name in shapes:
            tt = vi.type.tensor_type
            tt.shape.Clear()
            for d in shapes[vi.name]:
                tt.shape.dim.add().dim_value = int(d)



