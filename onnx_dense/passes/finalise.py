"""Finalise: a dense model that runs at any image size and says what it is.

Rules:

* Outputs of heads (positions inserted after the batch axis) are transposed back so the
  original's axes come first and the spatial axes last: (B, classes) -> (B, classes, H, W).
* ``metadata_props['onnx_dense']`` records, per output, eST, the dense grid's stride in
  input pixels, the spatial axes and the receptive field (see :mod:`onnx_dense.metadata`).
* Spatial dims of inputs and outputs become symbolic; intermediate shapes, computed at the
  static size and now stale, are dropped.
* Dead nodes and initializers go, nodes are sorted, and the ONNX checker must pass.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from onnx_dense import metadata
from onnx_dense.grid import Grid
from onnx_dense.passes.plans import ANALYSIS, Analysis

_AXIS_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def _analysis(model: ir.Model) -> Analysis:
    return model.meta[ANALYSIS]


class RestoreOutputLayout(ir.passes.InPlacePass):
    """Head outputs: (B, *spatial, *features) -> (B, *features, *spatial)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for info in _analysis(model).outputs:
            g = info.grid
            if g is None or not g.inserted:
                continue
            index = next(i for i, v in enumerate(graph.outputs) if v.name == info.name)
            value = graph.outputs[index]
            n = g.rank
            rank = (value.shape.rank() if value.shape is not None else 2) + n
            perm = [0, *range(n + 1, rank), *range(1, n + 1)]
            value.name = f"{info.name}_positions_first"
            node = ir.node("Transpose", [value], {"perm": perm}, name=f"{info.name}_to_nchw")
            node.outputs[0].name = info.name
            node.outputs[0].type = value.type
            graph.append(node)
            graph.outputs[index] = node.outputs[0]
            modified = True
        return ir.passes.PassResult(model, modified)


class RecordDenseMetadata(ir.passes.InPlacePass):
    """Write the DenseInfo of this rewrite into the model's metadata_props."""

    def __init__(self, strategy: str = "dilate", source: str | None = None) -> None:
        super().__init__()
        self.strategy = strategy
        self.source = source

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.metadata_props[metadata.KEY] = describe(model, self.strategy, self.source).to_json()
        return ir.passes.PassResult(model, True)


def describe(model: ir.Model, strategy: str = "dilate", source: str | None = None) -> metadata.DenseInfo:
    analysis = _analysis(model)
    inputs = {}
    for value in model.graph.inputs:
        axes = analysis.input_axes.get(value.name)
        if axes is None or value.shape is None:
            continue
        size = tuple(int(value.shape.dims[a]) for a in axes)
        inputs[value.name] = metadata.DenseInput(value.name, tuple(axes), size)
    outputs = {}
    for info in analysis.outputs:
        g: Grid | None = info.grid
        if g is None or g.axes is None:
            continue
        if g.inserted:  # the original's axes, then the spatial ones (RestoreOutputLayout)
            rank = (info.shape.rank() if info.shape is not None else 2) + g.rank
            axes = tuple(range(rank - g.rank, rank))
        else:
            axes = g.axes
        outputs[info.name] = metadata.DenseOutput(
            name=info.name,
            spatial_axes=tuple(axes),
            est=g.est,
            stride=g.dense_stride,
            original_stride=g.stride,
            rf_size=g.rf_size,
            rf_start=g.rf_start,
            inserted=g.inserted,
            input=g.source,
            size=g.size,
            dense_size=g.dense_size,
        )
    from onnx_dense.passes.rederive_sizes import SIZE_LIMITS

    return metadata.DenseInfo(analysis.target, strategy, inputs, outputs, source, values=_dense_values(model),
                              fields=_dense_fields(model), fixed_sizes=list(model.meta.get(SIZE_LIMITS, [])) or None)


def _dense_values(model: ir.Model) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """eST and spatial axes of every named value in the dense region (what the phase schedule reads)."""
    from onnx_dense.grid import GRID

    values = {}
    for node in model.graph:
        for value in node.outputs:
            g = value.meta.get(GRID)
            if value.name and g is not None and g.axes is not None and g.is_dense and not g.flattened:
                values[value.name] = (tuple(g.est), tuple(g.axes))
    return values


def _dense_fields(model: ir.Model) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Dense stride and receptive field of every dense value whose positions each see one window
    of the input (not global context, not an upsampled map): what tiling a stage needs."""
    from onnx_dense.grid import GRID

    fields = {}
    for node in model.graph:
        for value in node.outputs:
            g = value.meta.get(GRID)
            if (value.name and g is not None and g.axes is not None and g.is_dense and not g.flattened
                    and not g.global_from and g.info is None and not g.inserted):
                fields[value.name] = (tuple(g.dense_stride), tuple(g.rf_start), tuple(g.rf_size))
    return fields


class DynamicSpatialDims(ir.passes.InPlacePass):
    """Symbolic spatial dims on inputs and outputs; stale intermediate shapes dropped."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnx_dense.passes.static_shapes import DECLARED_OUTPUTS, DYNAMIC_DIMS

        graph = model.graph
        info = metadata.read(model)
        freed = model.meta.get(DYNAMIC_DIMS, {})  # axes --input-shape fixed that the original left dynamic
        batch = {}  # the size given to a freed axis 0: an output's axis 0 of that size is freed too
        for value in graph.inputs:
            entry = info.inputs.get(value.name) if info else None
            if value.shape is None:
                continue
            dims = list(value.shape.dims)
            spatial = entry.spatial_axes if entry is not None else ()
            for a, symbol in freed.get(value.name, {}).items():
                if a not in spatial and a < len(dims):
                    if a == 0 and isinstance(dims[0], int):
                        batch[dims[0]] = symbol
                    dims[a] = ir.SymbolicDim(symbol)
            value.shape = ir.Shape(dims)
            if entry is None:
                continue
            names = _AXIS_NAMES.get(len(entry.spatial_axes), ())
            for k, a in enumerate(entry.spatial_axes):
                label = names[k] if k < len(names) else f"s{k}"
                dims[a] = ir.SymbolicDim(f"{value.name}_{label}")
            value.shape = ir.Shape(dims)
        outputs = set(graph.outputs)
        for node in graph:
            for out in node.outputs:
                if out not in outputs:
                    out.shape = None
                    out.type = None
        originals = {o.name: o for o in _analysis(model).outputs}
        for value in graph.outputs:
            original = originals.get(value.name)
            if original is None or original.shape is None:
                continue
            dims = list(original.shape.dims)
            entry = info.outputs.get(value.name) if info else None
            spatial = entry.spatial_axes if entry is not None else ()
            if dims and 0 not in spatial and isinstance(dims[0], int) and dims[0] in batch:
                declared = model.meta.get(DECLARED_OUTPUTS, {}).get(value.name) or [None]
                dims[0] = ir.SymbolicDim(declared[0].value if isinstance(declared[0], ir.SymbolicDim) else None)
            if entry is not None:
                if entry.inserted:
                    dims += [None] * len(entry.spatial_axes)
                names = _AXIS_NAMES.get(len(entry.spatial_axes), ())
                for k, a in enumerate(entry.spatial_axes):
                    label = names[k] if k < len(names) else f"s{k}"
                    dims[a] = ir.SymbolicDim(f"{value.name}_{label}")
            value.shape = ir.Shape(dims)
        return ir.passes.PassResult(model, True)


class CheckModel(ir.passes.InPlacePass):
    """The ONNX checker must accept the result (a failure here is a bug in onnx-dense)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnx_dense.passes.static_shapes import _light_proto

        onnx.checker.check_model(_light_proto(model))
        return ir.passes.PassResult(model, False)
