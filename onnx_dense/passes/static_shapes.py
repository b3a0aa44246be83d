"""Normalise: give every tensor a static shape at the user's input size.

Rules:
* ``--input-shape NAME:1,3,224,224`` overrides a graph input's shape; an unknown NAME or a
  rank that disagrees with the model is an error.
* Every input dim except the batch (axis 0) must then be static: spatial sizes decide pads,
  kernels of converted heads and output sizes.
* Shapes of all intermediate values come from ONNX shape inference with data propagation.
  Large initializers are hidden from it (it only needs their shapes), so a 500 MB model is
  not copied. onnx-ir's own ShapeInferencePass logs and swallows inference errors; this
  pass turns them into a one-line error instead, which is why it is not used directly.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnx_dense.errors import DenseError
from onnx_dense.passes import _ir

_SMALL = 1024  # initializers up to this many bytes stay visible to data propagation


DYNAMIC_DIMS = "onnx_dense.dynamic_dims"  # model.meta: input -> {axis: symbol or None} before --input-shape
DECLARED_OUTPUTS = "onnx_dense.declared_outputs"  # model.meta: output -> its dims as the file declared them


class SetStaticInputShapes(ir.passes.InPlacePass):
    """Apply ``--input-shape`` overrides and insist on static non-batch input dims. The axes
    an override fixed that the original left dynamic are remembered, so that the dense model
    leaves them dynamic too (its batch, where the hint said 1)."""

    def __init__(self, input_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        super().__init__()
        self.input_shapes = dict(input_shapes or {})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = {v.name: v for v in graph.inputs}
        modified = False
        for name, dims in self.input_shapes.items():
            if name not in by_name:
                names = ", ".join(sorted(n for n in by_name if n not in graph.initializers))
                raise DenseError(f"--input-shape names '{name}', which is not an input of the model (inputs: {names})")
            value = by_name[name]
            if value.shape is not None and value.shape.rank() != len(dims):
                raise DenseError(
                    f"--input-shape {name}: rank {len(dims)} given but the model's input has rank {value.shape.rank()} "
                    f"({_dims_text(value.shape)})"
                )
            if any(d <= 0 for d in dims):
                raise DenseError(f"--input-shape {name}: dims must be positive, got {','.join(map(str, dims))}")
            if value.shape is not None:  # what the original left dynamic (finalise.DynamicSpatialDims)
                model.meta.setdefault(DYNAMIC_DIMS, {})[name] = {
                    i: (None if isinstance(d, int) else d.value) for i, d in enumerate(value.shape.dims)
                    if not isinstance(d, int) or d < 0}  # (paddle2onnx writes -1)
                model.meta.setdefault(DECLARED_OUTPUTS, {}).update(
                    {o.name: list(o.shape.dims) for o in graph.outputs if o.shape is not None})
            value.shape = ir.Shape(dims)
            modified = True
        for value in graph.inputs:
            if value.name in graph.initializers:
                continue
            if value.shape is None:
                raise DenseError(f"input '{value.name}' has no shape in the model; give one with --input-shape {value.name}:1,3,H,W")
            dynamic = [i for i, d in enumerate(value.shape.dims) if i > 0 and not isinstance(d, int)]
            if dynamic:
                raise DenseError(
                    f"input '{value.name}' has dynamic dims ({_dims_text(value.shape)}); the rewrite needs its size: "
                    f"pass --input-shape {value.name}:{_shape_hint(value.shape)} with the size it runs at "
                    "(e.g. its training size)"
                )
        return ir.passes.PassResult(model, modified)


class InferStaticShapes(ir.passes.InPlacePass):
    """Fill in every value's shape by ONNX shape inference, failing loudly.

    Shapes of computed values are inferred afresh: after a normalising pass changed pads the
    old ones are stale, and a graph output may declare what ONNX, not ONNX Runtime, computes
    (a ceil_mode window starting in the end padding); strict inference would reject either
    disagreement. A declared shape stays where inference finds none.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        declared = {}
        for node in model.graph:
            for out in node.outputs:
                declared[out] = out.shape
                out.shape = None
        modified = self._infer(model)
        for _ in range(_ROUNDS):  # what ONNX's data propagation does not follow, then inference again
            if not _shape_operands_at_static_size(model):
                break
            self._infer(model)
        for value, shape in declared.items():
            if value.shape is None:
                value.shape = shape
        return ir.passes.PassResult(model, modified)

    def _infer(self, model: ir.Model) -> bool:
        proto = _light_proto(model)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=True, data_prop=True)
        except (onnx.shape_inference.InferenceError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
            line = next((ln for ln in str(exc).splitlines() if ln.strip()), str(exc))
            raise DenseError(f"shape inference failed at the given input size: {line.strip()[:300]}") from None
        shapes: dict[str, onnx.TypeProto] = {}
        for info in list(inferred.graph.value_info) + list(inferred.graph.output):
            shapes[info.name] = info.type
        modified = False
        for node in model.graph:
            for out in node.outputs:
                type_proto = shapes.get(out.name)
                if type_proto is None or not type_proto.HasField("tensor_type"):
                    continue
                tt = type_proto.tensor_type
                if tt.HasField("shape"):
                    dims = [
                        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
                    ]
                    out.shape = ir.Shape(dims)
                    modified = True
                if tt.elem_type and out.dtype is None:
                    out.dtype = ir.DataType(tt.elem_type)
        return modified


_ROUNDS = 8
# Operands that give an output's shape (Resize's scales and sizes, Reshape's and Expand's shape,
# Tile's repeats, ConstantOfShape's shape): ONNX's data propagation follows them through Slice
# only from opset 13 (a TorchScript export at opset 11 computes Resize sizes as
# Concat(Shape(x)[0:2], [h, w])).
_SHAPE_OPERANDS = {"Resize": (2, 3), "Upsample": (1,), "Reshape": (1,), "Expand": (1,), "Tile": (1,),
                   "ConstantOfShape": (0,)}


def _shape_operands_at_static_size(model: ir.Model) -> bool:
    """Give each output whose shape inference left unknown, where its shape operands follow from
    constants and static dims, the shape ONNX infers with them as constants (the graph is not
    changed: at another size they are computed again). True if any shape was set."""
    from onnx_dense.passes.fold_constants import FoldShapeArithmetic, _static_shape

    folder = FoldShapeArithmetic()
    folder.opset = _ir.opset(model)
    found = False
    for node in model.graph:
        operands = _SHAPE_OPERANDS.get(node.op_type)
        if operands is None or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if _static_shape(out) is not None:
            continue
        data = [v for i, v in enumerate(node.inputs) if i not in operands and v is not None]
        if any(_static_shape(v) is None or v.dtype is None for v in data):
            continue
        arrays = {}
        for i in operands:
            if i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].name:
                array = folder.at_static_size(node.inputs[i])
                if array is None:
                    break
                arrays[i] = array
        else:
            dims = _infer_one(node, arrays, folder.opset)
            if dims is not None:
                out.shape = ir.Shape(dims)
                found = True
    return found


def _infer_one(node: ir.Node, arrays: dict[int, np.ndarray], opset: int) -> list[int] | None:
    """The static output dims ONNX infers for ``node`` alone, its operands ``arrays`` constants."""
    proto = ir.serde.serialize_node(node)
    inputs, inits = [], []
    for i, v in enumerate(node.inputs):
        if v is None or not v.name:
            continue
        if i in arrays:
            inits.append(onnx.numpy_helper.from_array(np.asarray(arrays[i]), proto.input[i]))
        else:
            inputs.append(onnx.helper.make_tensor_value_info(proto.input[i], int(v.dtype), list(_ir.static_dims(v))))
    graph = onnx.helper.make_graph([proto], "one", inputs, [onnx.helper.make_tensor_value_info(proto.output[0], 0, None)],
                                   inits)
    one = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        inferred = onnx.shape_inference.infer_shapes(one, check_type=False, strict_mode=True)
    except Exception:
        return None
    tt = inferred.graph.output[0].type.tensor_type
    if not tt.HasField("shape") or not all(d.HasField("dim_value") for d in tt.shape.dim):
        return None
    return [d.dim_value for d in tt.shape.dim]


def _light_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto with large initializers turned into typed inputs (no data copied).

    External-data initializers are always hidden: their location is relative to the model's
    folder, which neither shape inference nor the checker is told.
    """
    graph = model.graph
    hidden: list[ir.Value] = []
    n_inputs = len(graph.inputs)
    order = list(graph.initializers.values())
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or (tensor.nbytes <= _SMALL and not isinstance(tensor, ir.ExternalTensor)):
            continue  # small in-memory constants stay for data propagation; external ones never

        value.shape = value.shape or tensor.shape
        value.dtype = value.dtype or tensor.dtype
        hidden.append(value)
    try:
        for value in hidden:
            graph.initializers.pop(value.name)
            if value not in graph.inputs:
                graph.inputs.append(value)
        return ir.serde.serialize_model(model)
    finally:
        del graph.inputs[n_inputs:]
        graph.initializers.clear()
        for value in order:
            graph.register_initializer(value)


def _dims_text(shape: ir.Shape) -> str:
    """'1x3xHxW'; a dynamic dim by its name, '?' where it has none."""
    return "x".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape.dims)


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'input:1,3,224,224' -> ('input', (1, 3, 224, 224))."""
    name, sep, dims = text.rpartition(":")
    try:
        values = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
    except ValueError:
        values = ()
    if not sep or not name or not values:
        raise DenseError(f"--input-shape '{text}': expected NAME:D0,D1,... e.g. input:1,3,224,224")
    return name, values


def _shape_hint(shape: ir.Shape) -> str:
    """Static dims as they are, batch 1, other dynamic dims as placeholders (H,W; D,H,W; L)."""
    dims = list(shape.dims)
    dynamic = [i for i, d in enumerate(dims) if i > 0 and not (isinstance(d, int) and d > 0)]
    names = {1: ["L"], 2: ["H", "W"], 3: ["D", "H", "W"]}.get(len(dynamic), [f"D{k}" for k in range(len(dynamic))])
    hint = {i: n for i, n in zip(dynamic, names)}
    return ",".join(
        str(d) if isinstance(d, int) and d > 0 else ("1" if i == 0 else hint[i]) for i, d in enumerate(dims)
    )
