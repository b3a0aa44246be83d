"""Refuse, before anything is written, a model that cannot run at the size it is rewritten at.

A rewrite is only as good as its input: a Conv whose ``kernel_shape`` contradicts its weight,
an ``--input-shape`` with the wrong number of channels, or a size at which some window op
would produce no position, give a dense model that fails in onnxruntime (or a dense output
of 0x0 positions). onnx's shape inference (strict mode, with data propagation) runs first
with the sizes the rewrite will use; it does not check Conv weights against ``kernel_shape``
or the input's channels, nor sizes that reach 0, so those checks are written out here.

The inference runs on a skeleton of the model: weights larger than :data:`SMALL` elements are
declared by type and shape only (their values cannot matter to shapes), so a model with
gigabytes of weights is checked without copying them.
"""

from __future__ import annotations

import math

import onnx
import onnx.helper
import onnx.shape_inference
import onnx_ir as ir

from onnx_dense.errors import DenseError

SMALL = 4096  # initializers up to this many elements keep their values (shape arithmetic reads them)
WINDOW_OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv")


def check_model_runs(model: ir.Model, input_shapes: dict | None = None, outputs=None) -> None:
    """One DenseError line if ``model`` cannot run at its declared sizes overridden by ``input_shapes``.

    ``outputs`` (``--outputs``): only the part of the graph computing these tensors is checked,
    as only that part is rewritten (a baked upsampling size after the cut does not matter).
    """
    label = model.meta.get("onnx_dense.path") or "the model"
    input_shapes = {k: tuple(v) for k, v in (input_shapes or {}).items()}
    proto = _skeleton(model)
    graph = proto.graph
    if outputs and not _cut(graph, list(outputs)):
        return  # a name the cut does not know: CutAtOutputs says which
    weights = set(model.graph.initializers)
    sizes = []
    for vi in graph.input:
        dims = input_shapes.get(vi.name)
        shape = vi.type.tensor_type.shape
        if dims is not None and len(dims) == len(shape.dim) and all(d > 0 for d in dims):
            for dim, d in zip(shape.dim, dims):
                dim.Clear()
                dim.dim_value = d
        if vi.name in weights:
            continue
        sizes.append(f"{vi.name}:" + ",".join(str(d.dim_value) if d.HasField("dim_value") else "?" for d in shape.dim))
    at = ("at --input-shape " if input_shapes else "at its declared input size ") + " ".join(sizes)
    del graph.value_info[:]
    for vi in graph.output:  # declared at the export size, which --input-shape may change
        vi.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError, ValidationError: the first line says what
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if "Unsupported" in text or "No opset import" in text or "not a registered" in text:
            return  # an op onnx does not know: the rewrite names it if it matters
        raise DenseError(f"{label}: the model fails onnx's shape inference {at} ({text}); it cannot run there") from None
    shapes = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    for node in inferred.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in WINDOW_OPS:
            continue
        who = f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            _check_conv(node, f"{label}: {who}", attrs, shapes, at)
        for out in node.output[:1]:
            dims = shapes.get(out)
            if dims and len(dims) >= 3 and any(d is not None and d <= 0 for d in dims[2:]):
                raise DenseError(
                    f"{label}: {who} would produce '{out}' of size {_fmt(dims)} {at} "
                    "(the input is smaller than its windows); give a larger --input-shape"
                )


def _check_conv(node, who: str, attrs: dict, shapes: dict, at: str) -> None:
    w = shapes.get(node.input[1])
    if not w or len(w) < 3 or any(d is None for d in w):
        return
    kernel = attrs.get("kernel_shape")
    if kernel is not None and list(kernel) != list(w[2:]):
        raise DenseError(
            f"{who}: kernel_shape {_fmt(kernel)} contradicts its weight '{node.input[1]}' of shape {_fmt(w)} "
            f"(a {_fmt(w[2:])} kernel); the model cannot run: fix or re-export it"
        )
    x = shapes.get(node.input[0])
    group = int(attrs.get("group", 1))
    if x and len(x) == len(w) and x[1] is not None:
        want = w[1] * group if node.op_type == "Conv" else w[0]
        if x[1] != want:
            raise DenseError(
                f"{who}: its input '{node.input[0]}' has {x[1]} channels {at} but its weight "
                f"'{node.input[1]}' of shape {_fmt(w)} needs {want}; the model cannot run with these channels"
            )


def check_dense_sizes(outputs, at: str) -> None:
    """``outputs``: (name, dense size, receptive field) per spatial output; refuse one with no position."""
    for name, size, rf in outputs:
        if any(s <= 0 for s in size):
            raise DenseError(
                f"{at}: the dense output '{name}' would have {_fmt(size)} positions (the input is smaller than its "
                f"receptive field {_fmt(rf)}); give a larger --input-shape"
            )


def _fmt(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def input_label(model, input_shapes: dict | None = None) -> str:
    """'at input size input 1x3x224x224': each graph input's declared size, or the one --input-shape gives."""
    parts = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dims = (input_shapes or {}).get(value.name) or (value.shape.dims if value.shape is not None else ())
        parts.append(f"{value.name} {_fmt(d if isinstance(d, int) else None for d in dims)}")
    return "at input size " + ", ".join(parts)


def _cut(graph: onnx.GraphProto, names: list[str]) -> bool:
    """Keep only the nodes computing ``names``, which become the outputs; False if one is unknown."""
    producers = {o: node for node in graph.node for o in node.output if o}
    if any(n not in producers for n in names):
        return False
    needed, kept = set(names), []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    needed.update(i for n in sub.node for i in n.input if i)
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in reversed(kept)]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.output[:]
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return True


def _skeleton(model: ir.Model) -> onnx.ModelProto:
    graph = model.graph
    initializers = list(graph.initializers.values())
    graph.initializers.clear()
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for value in initializers:
            graph.register_initializer(value)
    inputs = {vi.name for vi in proto.graph.input}
    for value in initializers:
        tensor = value.const_value
        if tensor is None:
            continue
        dims = list(tensor.shape.numpy())
        if not isinstance(tensor, ir.ExternalTensor) and math.prod(dims) <= SMALL:
            init = ir.serde.serialize_tensor(tensor)
            init.name = value.name
            proto.graph.initializer.append(init)
        elif value.name not in inputs:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(value.name, tensor.dtype.value, dims))
    return proto
