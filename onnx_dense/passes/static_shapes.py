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

import onnx
import onnx_ir as ir

from onnx_dense.errors import DenseError

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
        for value, shape in declared.items():
            if value.shape is None:
                value.shape = shape
        return ir.passes.PassResult(model, modified)


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
