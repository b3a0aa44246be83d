"""The rewrite as the algorithm reads: normalise, analyse, rewrite, finalise.

Each step is an onnx-ir pass (or a Sequential of them) named for what it guarantees; see
each pass's module docstring for its rules.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import onnx_ir as ir
from onnx_ir.passes import Sequential
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnx_dense.errors import DenseError
from onnx_dense.grid import GRID, fmt
from onnx_dense.passes.analyse import ANALYSIS, AnalyseGrid, Analysis
from onnx_dense.passes.cut import CutAtOutputs
from onnx_dense.passes.densify_heads import DensifyFlattens, DensifyFullyConnected, DensifyGlobalPools, RemapHeadAxes
from onnx_dense.passes.densify_pads import DensifyPadsAndSlices
from onnx_dense.passes.densify_reshapes import DensifyReshapes
from onnx_dense.passes.densify_windows import DensifyWindows
from onnx_dense.passes.fold_constants import FoldShapeArithmetic
from onnx_dense.passes.explicit_padding import ExplicitAutoPad, ExplicitCeilMode
from onnx_dense.passes.finalise import CheckModel, DynamicSpatialDims, RecordDenseMetadata, RestoreOutputLayout
from onnx_dense.passes.static_shapes import InferStaticShapes, SetStaticInputShapes


@dataclasses.dataclass
class RewriteOptions:
    """What the user asked for (CLI flags of ``onnx-dense rewrite``)."""

    output_stride: int | tuple[int, ...] | None = None
    from_node: str | None = None
    outputs: Sequence[str] | None = None
    input_shapes: dict[str, tuple[int, ...]] | None = None
    source: str | None = None


class Step(Sequential):
    """A named stage of the pipeline. onnx-ir's Sequential wraps whatever a pass raises in a
    PassError; the user's one-line DenseError is taken back out of it here."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            return super().call(model)
        except ir.passes.PassError as exc:
            cause = exc.__cause__
            while cause is not None and not isinstance(cause, DenseError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise


def normalise(options: RewriteOptions) -> Step:
    return Step(
        CutAtOutputs(list(options.outputs or [])),
        SetStaticInputShapes(options.input_shapes),
        InferStaticShapes(),
        FoldShapeArithmeticToFixpoint(),
        ExplicitAutoPad(),
        ExplicitCeilMode(),
        InferStaticShapes(),
    )


class FoldShapeArithmeticToFixpoint(ir.passes.InPlacePass):
    """Folding reveals shapes, and shapes let more fold (an If behind a computed Pad)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for _ in range(8):
            if not FoldShapeArithmetic()(model).modified:
                break
            InferStaticShapes()(model)
            modified = True
        return ir.passes.PassResult(model, modified)


def rewrite() -> Step:
    return Step(
        DensifyWindows(),
        DensifyPadsAndSlices(),
        DensifyGlobalPools(),
        DensifyFlattens(),
        DensifyFullyConnected(),
        RemapHeadAxes(),
        DensifyReshapes(),
    )


def finalise(options: RewriteOptions) -> Step:
    return Step(
        RestoreOutputLayout(),
        RecordDenseMetadata(source=options.source),
        RemoveUnusedNodesPass(),
        TopologicalSortPass(),
        DynamicSpatialDims(),
        CheckModel(),
    )


def densify(model: ir.Model, options: RewriteOptions) -> ir.Model:
    """Rewrite ``model`` in place into its dense equivalent and return it."""
    normalise(options)(model)
    stride = resolve_output_stride(model, options)
    analyse(model, stride)
    rewrite()(model)
    finalise(options)(model)
    return model


def analyse(model: ir.Model, stride) -> Analysis:
    """Run the analysis; an unreachable stride gets the list of reachable ones."""
    try:
        AnalyseGrid(stride)(model)
    except UnreachableError:
        raise
    except DenseError as exc:
        if "is not reachable" in str(exc):
            reachable = reachable_output_strides(model)
            text = str(exc).rsplit("reachable output strides:", 1)[0]
            raise UnreachableError(f"{text}reachable output strides: {', '.join(map(fmt, reachable)) or 'none'}") from None
        raise
    return model.meta[ANALYSIS]


class UnreachableError(DenseError):
    pass


def resolve_output_stride(model: ir.Model, options: RewriteOptions):
    if options.output_stride is not None and options.from_node is not None:
        raise DenseError("give either --output-stride or --from, not both")
    if options.from_node is not None:
        return stride_from_node(model, options.from_node)
    if options.output_stride is None:
        reachable = reachable_output_strides(model)
        raise DenseError(
            "give --output-stride R (reachable for this model: "
            f"{', '.join(map(fmt, reachable)) or 'none'}) or --from NODE"
        )
    stride = options.output_stride
    values = (stride,) if isinstance(stride, int) else tuple(stride)
    if any(v < 1 for v in values):
        raise DenseError(f"--output-stride must be a positive integer, got {fmt(values)}")
    return stride


def stride_from_node(model: ir.Model, name: str) -> tuple[int, ...]:
    """The paper's 'set the stride of pool4 to 1': the dense grid stops at that node's input."""
    AnalyseGrid(None)(model)
    node = next((n for n in model.graph if n.name == name), None)
    if node is None:
        spatial = [n.name for n in model.graph if n.op_type in ("Conv", "MaxPool", "AveragePool") and n.name]
        hint = ", ".join(spatial[:12]) + (" ..." if len(spatial) > 12 else "")
        raise DenseError(f"--from '{name}': no node of that name (strided candidates: {hint})")
    plan = node.meta.get("onnx_dense.plan")
    grid = node.inputs[0].meta.get(GRID) if node.inputs and node.inputs[0] is not None else None
    strides = getattr(getattr(plan, "params", None), "strides", None)
    if grid is None or strides is None or all(s == 1 for s in strides):
        raise DenseError(f"--from '{name}': node {node.op_type} has no stride to remove; name a strided Conv or pool")
    return grid.stride


def reachable_output_strides(model: ir.Model) -> list[tuple[int, ...]]:
    """Output strides (the same on every spatial axis) for which every output ends on its grid."""
    base = AnalyseGrid(None)
    base(model)
    analysis: Analysis = model.meta[ANALYSIS]
    largest = max((max(o.grid.stride) for o in analysis.outputs if o.grid is not None and o.grid.stride), default=1)
    found = []
    for r in range(1, largest + 1):
        try:
            AnalyseGrid(r)(model)
        except DenseError:
            continue
        found.append((r,))
    AnalyseGrid(None)(model)
    return found
