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
from onnx_dense.passes.align_joins import AlignJoins
from onnx_dense.passes.cut import CutAtOutputs
from onnx_dense.passes.densify_heads import DensifyFlattens, DensifyFullyConnected, DensifyGlobalPools, RemapHeadAxes
from onnx_dense.passes.densify_pads import DensifyPadsAndSlices
from onnx_dense.passes.densify_reshapes import DensifyReshapes
from onnx_dense.passes.densify_windows import DensifyWindows
from onnx_dense.passes.fold_constants import FoldShapeArithmetic
from onnx_dense.passes.explicit_padding import ExplicitAutoPad, ExplicitCeilMode
from onnx_dense.passes.finalise import CheckModel, DynamicSpatialDims, RecordDenseMetadata, RestoreOutputLayout
from onnx_dense.passes.fragments import RecordFragmentsMetadata, SplitIntoPhases
from onnx_dense.passes.phase_global import MarkPerPhaseGlobal, PerPhaseGlobalContext
from onnx_dense.passes.static_shapes import InferStaticShapes, SetStaticInputShapes


@dataclasses.dataclass
class RewriteOptions:
    """What the user asked for (CLI flags of ``onnx-dense rewrite``)."""

    output_stride: int | tuple[int, ...] | None = None
    from_node: str | None = None
    outputs: Sequence[str] | None = None
    input_shapes: dict[str, tuple[int, ...]] | None = None
    source: str | None = None
    # "dilate" (one dilated graph), "fragments" (the original per phase, passes/fragments.py) or
    # "auto" (dilate where the analysis allows it, else fragments; onnx_dense/strategies.py tunes).
    strategy: str = "dilate"
    per_phase_global: bool = False  # dilate: global context as per-phase means (passes/phase_global.py)


STRATEGIES = ("auto", "dilate", "fragments")


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


def rewrite(options: RewriteOptions | None = None) -> Step:
    first = [PerPhaseGlobalContext()] if options is not None and options.per_phase_global else []
    return Step(
        *first,
        DensifyWindows(),
        DensifyPadsAndSlices(),
        AlignJoins(),
        DensifyGlobalPools(),
        DensifyFlattens(),
        DensifyFullyConnected(),
        RemapHeadAxes(),
        DensifyReshapes(),
    )


def fragments() -> Step:
    """Strategy "fragments": space-to-batch at removed strides, the original ops, batch-to-space."""
    return Step(DensifyReshapes(), SplitIntoPhases())


def finalise(options: RewriteOptions, strategy: str = "dilate") -> Step:
    if strategy == "fragments":
        record = [RecordFragmentsMetadata(source=options.source)]
    else:
        record = [RestoreOutputLayout(), RecordDenseMetadata(source=options.source)]
        if options.per_phase_global:
            record.append(MarkPerPhaseGlobal())
    return Step(
        *record,
        RemoveUnusedNodesPass(),
        TopologicalSortPass(),
        DynamicSpatialDims(),
        CheckModel(),
    )


def densify(model: ir.Model, options: RewriteOptions) -> ir.Model:
    """Rewrite ``model`` in place into its dense equivalent and return it."""
    normalise(options)(model)
    stride = resolve_output_stride(model, options)
    strategy = choose_strategy(model, stride, options)
    if strategy == "fragments":
        fragments()(model)
    else:
        rewrite(options)(model)
    finalise(options, strategy)(model)
    return model


def choose_strategy(model: ir.Model, stride, options: RewriteOptions) -> str:
    """Analyse for the requested strategy; "auto": dilate where the analysis allows it, else fragments."""
    if options.strategy not in STRATEGIES:
        raise DenseError(f"--strategy '{options.strategy}': expected one of {', '.join(STRATEGIES)}")
    if options.strategy == "fragments" and options.per_phase_global:
        raise DenseError("--per-phase-global is a form of --strategy dilate; fragments needs no such option")
    if options.strategy != "auto":
        analyse(model, stride, options.strategy, options.per_phase_global)
        return options.strategy
    try:
        analyse(model, stride, "dilate", options.per_phase_global)
        return "dilate"
    except UnreachableError:
        raise
    except DenseError as dilate_error:
        try:
            analyse(model, stride, "fragments")
        except DenseError as exc:
            if str(exc) == str(dilate_error):
                raise
            raise DenseError(f"{exc} (strategy auto; dilate refused too: {dilate_error})") from None
        return "fragments"


def analyse(model: ir.Model, stride, strategy: str = "dilate", per_phase_global: bool = False) -> Analysis:
    """Run the analysis; an unreachable stride gets the list of reachable ones."""
    try:
        AnalyseGrid(stride, strategy, per_phase_global)(model)
    except UnreachableError:
        raise
    except DenseError as exc:
        if "is not reachable" in str(exc):
            reachable = reachable_output_strides(model, strategy, per_phase_global)
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
        strategy = "dilate" if options.strategy == "dilate" else "fragments"  # auto: the more permissive
        reachable = reachable_output_strides(model, strategy, options.per_phase_global)
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


def reachable_output_strides(
    model: ir.Model, strategy: str = "dilate", per_phase_global: bool = False
) -> list[tuple[int, ...]]:
    """Output strides (the same on every spatial axis) for which every output ends on its grid."""
    base = AnalyseGrid(None)
    base(model)
    analysis: Analysis = model.meta[ANALYSIS]
    largest = max((max(o.grid.stride) for o in analysis.outputs if o.grid is not None and o.grid.stride), default=1)
    found = []
    for r in range(1, largest + 1):
        try:
            AnalyseGrid(r, strategy, per_phase_global)(model)
        except DenseError:
            continue
        found.append((r,))
    AnalyseGrid(None)(model)
    return found
