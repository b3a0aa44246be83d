"""The rewrite as the algorithm reads (``densify``):

1. normalise: cut, static shapes, folded shape arithmetic, baked Resize sizes (noted, or
   re-derived with ``rederive_sizes``), explicit pads;
2. analyse: grids, per-node plans, the strategy, the phase plan (fragments); every refusal
   happens here, and the graph is not touched (passes/analyse.py, passes/plans.py);
3. rewrite: the plans applied (dilate: passes/densify_*.py; fragments: passes/fragments.py);
4. finalise: metadata, dynamic spatial dims, the ONNX checker.

Each step is an onnx-ir pass (or a Sequential of them) named for what it guarantees; see
each pass's module docstring for its rules. The user's options are made canonical once, in
:class:`RewriteOptions` (the output stride a tuple); the strategy name becomes a :class:`Strategy`
in ``choose_strategy``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import onnx_ir as ir
from onnx_ir.passes import Sequential
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnx_dense.errors import DenseError
from onnx_dense.grid import GRID, Grid, fmt
from onnx_dense.passes.analyse import AnalyseGrid
from onnx_dense.passes.analysis.phases import PlanPhases
from onnx_dense.passes.align_joins import AlignJoins
from onnx_dense.passes.cut import CutAtOutputs
from onnx_dense.passes.densify_heads import DensifyFlattens, DensifyFullyConnected, DensifyGlobalPools, RemapHeadAxes
from onnx_dense.passes.densify_pads import DensifyPadsAndSlices
from onnx_dense.passes.densify_reshapes import DensifyReshapes
from onnx_dense.passes.densify_windows import DensifyWindows
from onnx_dense.passes.fold_constants import FoldShapeArithmetic
from onnx_dense.passes.explicit_padding import ExplicitAutoPad, ExplicitCeilMode
from onnx_dense.passes.finalise import CheckModel, DynamicSpatialDims, RecordDenseMetadata, RestoreOutputLayout
from onnx_dense.passes.analysis.final_upsampling import final_blocks
from onnx_dense.passes.final_upsampling import RebuildFinalUpsampling
from onnx_dense.passes.fragments import RecordFragmentsMetadata, SplitIntoPhases
from onnx_dense.passes.phase_global import MarkPerPhaseGlobal, PerPhaseGlobalContext
from onnx_dense.passes.rederive_sizes import RederiveSizes
from onnx_dense.passes.plans import ANALYSIS, DEFAULT_STRATEGY, Analysis, Strategy, UnreachableStride
from onnx_dense.passes.static_shapes import InferStaticShapes, SetStaticInputShapes


@dataclasses.dataclass
class RewriteOptions:
    """What the user asked for (CLI flags of ``onnx-dense rewrite``)."""

    # One canonical form, set here at the boundary: a tuple, one value (every spatial axis) or
    # one per spatial axis; an int or any sequence of ints given is turned into it.
    output_stride: tuple[int, ...] | None = None
    from_node: str | None = None
    outputs: Sequence[str] | None = None
    input_shapes: dict[str, tuple[int, ...]] | None = None
    source: str | None = None
    # Strategy (passes/plans.py) or its name; onnx_dense/strategies.py tunes "auto".
    strategy: Strategy | str = DEFAULT_STRATEGY
    per_phase_global: bool = False  # dilate: global context as per-phase means (passes/phase_global.py)
    rederive_sizes: bool = False  # Resize sizes baked at export taken from the graph (passes/rederive_sizes.py)
    # Segmentation heads: False outputs the dense score map before the final upsampling instead
    # of rebuilding the upsampling on it (passes/final_upsampling.py).
    final_upsampling: bool = True

    def __post_init__(self) -> None:
        self.output_stride = canonical_stride(self.output_stride)


def canonical_stride(stride: int | Sequence[int] | None) -> tuple[int, ...] | None:
    """8 -> (8,), [8, 4] -> (8, 4): the one form the analysis reads."""
    if stride is None:
        return None
    if isinstance(stride, int):
        return (stride,)
    return tuple(int(v) for v in stride)


STRATEGIES = tuple(s.value for s in Strategy)


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


def densify(model: ir.Model, options: RewriteOptions) -> ir.Model:
    """Rewrite ``model`` in place into its dense equivalent and return it.

    A segmentation head's output whose final upsampling (passes/analysis/final_upsampling.py)
    reads a score map T coarser than the stride asked for is cut at T, the rest made dense, and
    the upsampling rebuilt on the dense T (passes/final_upsampling.py); with
    ``final_upsampling=False`` the dense T is the output.
    """
    normalise(options)(model)
    stride = resolve_output_stride(model, options)
    blocks = final_upsampling_route(model, stride, options)
    rebuild = None
    if blocks:
        originals = {v.name: (v.type, v.shape) for v in model.graph.outputs}
        rf = {v.name: (v.meta[GRID].rf_size, v.meta[GRID].rf_start) for v in model.graph.outputs if v.name in blocks}
        CutAtOutputs(cut_names(model, blocks))(model)
        if options.final_upsampling:
            rebuild = RebuildFinalUpsampling(blocks, originals, rf)
    strategy = analyse(model, stride, options)
    rewrite(options, strategy)(model)
    finalise(options, strategy)(model)
    if rebuild is not None:
        Step(rebuild, TopologicalSortPass(), CheckModel())(model)
    return model


def cut_names(model: ir.Model, blocks: dict) -> list[str]:
    """Graph outputs with each upsampled one replaced by its score map (once)."""
    names: list[str] = []
    for v in model.graph.outputs:
        name = blocks[v.name].score if v.name in blocks else v.name
        if name not in names:
            names.append(name)
    return names


def final_upsampling_route(model: ir.Model, stride, options: RewriteOptions) -> dict:
    """The final blocks to cut at (and rebuild unless ``final_upsampling`` is off): those of the
    outputs whose score map is coarser than ``stride``. Refuses a learned block there, naming it
    and offering --no-final-upsampling."""
    try:
        AnalyseGrid(None)(model)
    except DenseError:
        if not options.final_upsampling:
            raise
        return {}  # the analysis at the stride asked for says what is wrong
    blocks = final_blocks(model)
    if not options.final_upsampling:
        if not blocks:
            raise DenseError(
                "--no-final-upsampling: no output of this model is an upsampled map (every output's predictions are "
                "as far apart as its positions); rewrite without it"
            )
        return blocks
    if stride is None:
        return {}
    chosen = {}
    for name, block in blocks.items():
        n = len(block.score_stride)
        tgt = stride * n if len(stride) == 1 else tuple(stride)
        if len(tgt) != n or all(r >= s for r, s in zip(tgt, block.score_stride)):
            continue  # at or above the score map's stride: nothing to rebuild
        dense = tuple(min(r, s) for r, s in zip(tgt, block.score_stride))
        est = tuple(s // d for s, d in zip(block.score_stride, dense))
        if not block.fixed:
            raise DenseError(
                f"node {block.node}: {block.problem} (at output stride {fmt(tgt)} it would run at eST {fmt(est)}); "
                f"rewrite with --no-final-upsampling to output the score map '{block.score}' itself (dense, a prediction "
                f"every {fmt(dense)} px), or choose output stride {fmt(block.score_stride)}"
            )
        if any(d % o for d, o in zip(dense, block.out_stride)):
            raise DenseError(
                f"output '{name}': output stride {fmt(tgt)} is not reachable: its final upsampling {block.node} returns to "
                f"a grid of stride {fmt(block.out_stride)}; choose a multiple of it, or --no-final-upsampling"
            )
        chosen[name] = block
    return chosen


def normalise(options: RewriteOptions) -> Step:
    return Step(
        CutAtOutputs(list(options.outputs or [])),
        SetStaticInputShapes(options.input_shapes),
        InferStaticShapes(),
        FoldShapeArithmeticToFixpoint(),
        RederiveSizes(options.rederive_sizes),
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


def analyse(model: ir.Model, stride: tuple[int, ...], options: RewriteOptions) -> Strategy:
    """The analysis step: grids and plans for the strategy asked for ("auto": dilate where the
    analysis allows it, else fragments), and the phase plan under fragments. Every refusal
    happens here, before the rewrite touches the graph. Returns the strategy chosen."""
    strategy = choose_strategy(model, stride, options)
    if strategy == Strategy.FRAGMENTS:
        Step(PlanPhases())(model)
    return strategy


def rewrite(options: RewriteOptions, strategy: Strategy = Strategy.DILATE) -> Step:
    """Apply the plans the analysis left."""
    if strategy == Strategy.FRAGMENTS:
        # Space-to-batch at removed strides, the original ops, batch-to-space.
        return Step(DensifyReshapes(), SplitIntoPhases())
    first = [PerPhaseGlobalContext()] if options.per_phase_global else []
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


def finalise(options: RewriteOptions, strategy: Strategy = Strategy.DILATE) -> Step:
    if strategy == Strategy.FRAGMENTS:
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


def choose_strategy(model: ir.Model, stride, options: RewriteOptions) -> Strategy:
    """Analyse for the requested strategy; "auto": dilate where the analysis allows it, else fragments."""
    strategy = Strategy.parse(options.strategy)
    if strategy == Strategy.FRAGMENTS and options.per_phase_global:
        raise DenseError("--per-phase-global is a form of --strategy dilate; fragments needs no such option")
    if strategy != Strategy.AUTO:
        analyse_grid(model, stride, strategy, options.per_phase_global)
        return strategy
    try:
        analyse_grid(model, stride, Strategy.DILATE, options.per_phase_global)
        return Strategy.DILATE
    except UnreachableStride as unreachable:
        # fragments reaches strides dilate cannot (through upsamplings): its verdict, with the
        # strides auto can reach, is the one to give; dilate's stands where fragments refuses a node
        try:
            analyse_grid(model, stride, Strategy.FRAGMENTS)
        except UnreachableStride:
            raise
        except DenseError:
            raise unreachable from None
        return Strategy.FRAGMENTS
    except DenseError as dilate_error:
        try:
            analyse_grid(model, stride, Strategy.FRAGMENTS)
        except UnreachableStride:
            raise  # no lowering gets past a stride the model cannot reach: dilate's refusal is beside the point
        except DenseError as exc:
            if str(exc) == str(dilate_error):
                raise
            raise DenseError(f"{exc} (strategy auto; dilate refused too: {dilate_error})") from None
        return Strategy.FRAGMENTS


def analyse_grid(
    model: ir.Model, stride, strategy: Strategy | str = Strategy.DILATE, per_phase_global: bool = False
) -> Analysis:
    """Grids and node plans; an unreachable stride is refused with the list of reachable ones."""
    try:
        AnalyseGrid(stride, strategy, per_phase_global)(model)
    except UnreachableStride as exc:
        raise exc.with_reachable(reachable_output_strides(model, strategy, per_phase_global)) from None
    return model.meta[ANALYSIS]


def resolve_output_stride(model: ir.Model, options: RewriteOptions):
    if options.output_stride is not None and options.from_node is not None:
        raise DenseError("give either --output-stride or --from, not both")
    if options.from_node is not None:
        return stride_from_node(model, options.from_node)
    if options.output_stride is None:
        # auto: the more permissive fragments
        strategy = Strategy.DILATE if options.strategy == Strategy.DILATE else Strategy.FRAGMENTS
        reachable = reachable_output_strides(model, strategy, options.per_phase_global)
        raise DenseError(
            "give --output-stride R (reachable for this model: "
            f"{', '.join(map(fmt, reachable)) or 'none'}) or --from NODE"
        )
    stride = options.output_stride
    if any(v < 1 for v in stride):
        raise DenseError(f"--output-stride must be a positive integer, got {fmt(stride)}")
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
    model: ir.Model, strategy: Strategy | str = Strategy.DILATE, per_phase_global: bool = False
) -> list[tuple[int, ...]]:
    """Output strides for which every output ends on its grid and, on every axis, some output
    on the stride itself. One value each, ``(r,)``, where every output's stride is the same
    on every axis; else one per axis (``(3, 2)``; ``(r,)`` still where they are equal)."""
    AnalyseGrid(None)(model)
    analysis: Analysis = model.meta[ANALYSIS]
    grids = [o.grid for o in analysis.outputs if o.grid is not None and o.grid.axes is not None and o.grid.stride]
    found = []
    for r in stride_candidates(grids):
        try:
            chosen = final_upsampling_route(model, r, RewriteOptions())
            if chosen:  # the rewrite cuts at the score maps: analyse that cut, on a copy
                cut = ir.serde.deserialize_model(ir.serde.serialize_model(model))
                CutAtOutputs(cut_names(cut, chosen))(cut)
                AnalyseGrid(r, strategy, per_phase_global)(cut)
            else:
                AnalyseGrid(r, strategy, per_phase_global)(model)
        except DenseError:
            continue
        found.append(r)
    AnalyseGrid(None)(model)
    return found


def stride_candidates(grids: Sequence[Grid]) -> list[tuple[int, ...]]:
    """Output strides worth trying: 1 to the largest where every stride is the same on every
    axis; else, per axis, the divisors of the outputs' strides, every combination in order."""
    if all(len(set(g.info_stride)) == 1 for g in grids):
        largest = max((g.info_stride[0] for g in grids), default=1)
        return [(r,) for r in range(1, largest + 1)]
    rank = max(g.rank for g in grids)
    per_axis = [
        sorted({d for g in grids if g.rank == rank for d in range(1, g.info_stride[i] + 1) if g.info_stride[i] % d == 0})
        for i in range(rank)
    ]
    return [(c[0],) if len(set(c)) == 1 else c for c in itertools.product(*per_axis)]
