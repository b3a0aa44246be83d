"""Plan strategy "fragments": which removed strides become levels of phases, checked before any mutation.

The rules (and what is exact) are in passes/fragments.py, which applies this plan
(``SplitIntoPhases``). Planning reads only the grids and SpatialPlans the rule modules left,
so it runs in the analysis step, after AnalyseGrid(R, "fragments"), and every refusal of
the strategy happens before the graph is touched. The plan holds nodes and values, not
positions: the rewrite passes that run before the split (densify_reshapes.py) add shape
arithmetic only, which the plan does not look at.

What the split will need is checked here too, by the functions fragments.py applies: a
Reshape target or Resize sizes/scales that bake the batch (:func:`reshape_batch_target`,
:func:`resize_batch_fix`) and outputs of phases without a known layout
(:func:`check_output_of_phases`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnx_dense.errors import UnsupportedNodeError, node_label
from onnx_dense.grid import GRID, PLAN, Grid
from onnx_dense.passes import _ir
from onnx_dense.passes.plans import CHANNEL_GLOBAL, PHASES, Layout, Level, PhasePlan, ReshapePlan, SpatialPlan

INT64_MAX = np.iinfo(np.int64).max
UPSAMPLING_OPS = ("Resize", "Upsample", "DepthToSpace")


class PlanPhases(ir.passes.InPlacePass):
    """Leave the PhasePlan in ``model.meta[PHASES]`` (after AnalyseGrid with strategy "fragments")."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        p = plan(model)
        # In the order SplitIntoPhases meets them, so the first refusal is the one it would give.
        for node in p.reshapes:
            if not isinstance(node.meta.get(PLAN), ReshapePlan):  # those are rebuilt (densify_reshapes.py)
                reshape_batch_target(node)
        for node in p.resizes:
            resize_batch_fix(node)
        for value, _ in p.outputs:
            check_output_of_phases(value)
        model.meta[PHASES] = p
        return ir.passes.PassResult(model, False)


def removal(node: ir.Node) -> tuple[SpatialPlan, Grid] | None:
    plan = node.meta.get(PLAN)
    if not isinstance(plan, SpatialPlan) or plan.kept == plan.params.strides:
        return None
    return plan, node.inputs[0].meta.get(GRID)


def _level(node: ir.Node, plan: SpatialPlan, g: Grid) -> Level:
    n = len(plan.params.kernel)
    rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
    if g is None or rank is None:
        raise UnsupportedNodeError(node, "removes a stride of a tensor of unknown layout")
    if g.axes is None:  # the raw input: the grid is set up by this very node, stride 1
        stride = (1,) * n
    elif g.rank != n or tuple(g.axes) != tuple(range(rank - n, rank)):
        raise UnsupportedNodeError(
            node, "removes a stride on axes that are not exactly the image's last axes", "choose another output stride"
        )
    else:
        stride = g.stride
    factor = tuple(s // k for s, k in zip(plan.params.strides, plan.kept))
    shift = tuple(k * S for k, S in zip(plan.kept, stride))
    return Level(factor, shift)


def _is_upsampling(node: ir.Node) -> bool:
    if node.op_type in UPSAMPLING_OPS:
        return True
    if node.op_type == "ConvTranspose":
        return any(s > 1 for s in (node.attributes.get_ints("strides") or ()))
    return False


def _plan(model: ir.Model, disabled: frozenset) -> PhasePlan:
    graph = model.graph
    layouts: dict[ir.Value, Layout] = {}
    # shape vectors read from a tensor of phases: its levels (None: read from several)
    shapes: dict[ir.Value, Layout | None] = {}
    p = PhasePlan(layouts, [], [], [], [], [], set())
    # Every level, disabled ones too: upsamplings collapse levels by these, as the analysis'
    # eST counts them (a disabled level still moves the grid of what follows it).
    virtual: dict[ir.Value, Layout] = {}
    for node in graph:
        ins = [(v, layouts.get(v, ())) for v in node.inputs if v is not None]
        layout = _merge(node, ins)
        vlayout = next((virtual[v] for v in node.inputs if v is not None and virtual.get(v)), ())
        read = {shapes[v] for v in node.inputs if v is not None and v in shapes}
        if any(v in p.global_values for v, _ in ins):
            p.global_values.update(node.outputs)
        found = removal(node)
        if found is not None:
            plan, g = found
            level = _level(node, plan, g)
            vlayout = vlayout + (level,)
            if level not in disabled:
                if node.op_type == "MaxPool" and len(node.outputs) > 1 and _used(node.outputs[1]):
                    raise UnsupportedNodeError(node, "MaxPool indices of a pool computed per phase index a different tensor")
                p.splits.append((node, level))
                p.levels_at.setdefault(len(layout), {}).setdefault(level, node_label(node))
                layout = layout + (level,)
        if vlayout and node.op_type not in ("Shape", "Size"):
            if _is_upsampling(node):
                vlayout = _collapse(node, vlayout, None)
            virtual.update((out, vlayout) for out in node.outputs)
        if not layout:
            if read:  # shape arithmetic: the vector keeps the batch (number of phases) it was read with
                tag = read.pop() if len(read) == 1 else None
                shapes.update((out, tag) for out in node.outputs)
            continue
        if node.op_type in ("Shape", "Size"):
            shapes.update((out, layout) for out in node.outputs)
            continue  # a shape vector: no batch of phases, but its batch entry counts them
        _check_batch_axis(node)
        if _is_upsampling(node):
            kept = virtual.get(node.outputs[0], ())
            dropped = [lvl for lvl in layout if lvl not in kept]
            if dropped:
                p.collapses.append((node, math.prod(lvl.phases for lvl in dropped)))
                first = min(layout.index(lvl) for lvl in dropped)  # the deepest levels go first
                if p.depth_limit is None or first < p.depth_limit[0]:
                    p.depth_limit = (first, f"node '{node.name}' ({node.op_type}) upsamples past the removed stride "
                                            f"of level {first + 1}, so that level's phases are not separate runs")
            layout = tuple(lvl for lvl in layout if lvl in kept)
        _check_shape_operands(node, layout, shapes)
        if node.op_type == "Reshape":
            rp = node.meta.get(PLAN)
            if isinstance(rp, ReshapePlan) and not rp.batch_from_input:
                raise UnsupportedNodeError(node, "reshapes the batch axis, which holds the phases under --strategy fragments")
            p.reshapes.append(node)
        if node.op_type == "Resize" and any(
            i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].name for i in (2, 3)
        ):
            p.resizes.append(node)
        if node.op_type in CHANNEL_GLOBAL or node.op_type.startswith("Global") or any(
            node.name in getattr(o.meta.get(GRID), "global_from", ()) for o in node.outputs
        ):
            p.global_values.update(node.outputs)
        for out in node.outputs:
            layouts[out] = layout
    for value in graph.outputs:
        layout = layouts.get(value, ())
        g = value.meta.get(GRID)
        if layout or (g is not None and g.inserted):  # a head's (N, K) gets its spatial axes even unsplit
            p.outputs.append((value, layout))
            if value in p.global_values:
                p.global_outputs.add(value.name)
    return p


def _used(value: ir.Value) -> bool:
    return bool(value.uses()) or value.is_graph_output()


def _merge(node: ir.Node, ins) -> Layout:
    """The layout of a node's operands: all that carry phases must carry the same levels."""
    carried = [(v, lay) for v, lay in ins if lay]
    if not carried:
        return ()
    first_v, first = carried[0]
    for v, lay in carried[1:]:
        if lay != first:
            raise UnsupportedNodeError(
                node, f"combines '{first_v.name}' and '{v.name}', whose phases come from different removed strides "
                f"({_describe(first)} vs {_describe(lay)})", "choose another output stride",
            )
    for v, lay in ins:
        if not lay and v.meta.get(GRID) is not None and v.meta[GRID].axes is not None and v.const_value is None:
            raise UnsupportedNodeError(
                node, f"combines '{first_v.name}', computed per phase, with '{v.name}', computed once",
                "choose an output stride that removes no stride before both branches meet",
            )
    return first


# Inputs that are shape vectors whose first entry sizes the batch axis (the phases).
_SHAPE_OPERANDS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,)}


def _check_shape_operands(node: ir.Node, layout: Layout, shapes: dict) -> None:
    """A shape vector read from a tensor of other levels sizes the batch with another number of
    phases: refused. (Resize sizes and scales are rebuilt from the running tensor instead.)"""
    for i in _SHAPE_OPERANDS.get(node.op_type, ()):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None or v not in shapes or shapes[v] == layout:
            continue
        if node.op_type == "Reshape":
            rp = node.meta.get(PLAN)
            if isinstance(rp, ReshapePlan):
                continue  # its target is rebuilt from the running tensor (densify_reshapes.py)
        tag = shapes[v]
        source = "tensors of different phases" if tag is None else f"a tensor with phases {_describe(tag)}"
        raise UnsupportedNodeError(
            node, f"takes its shape '{v.name}' from {source}, so its batch axis (phases {_describe(layout)} under "
            "--strategy fragments) would get another size", "choose another output stride, or use --strategy dilate",
        )


def _describe(layout: Layout) -> str:
    return " then ".join("x".join(map(str, lvl.factor)) for lvl in layout) or "none"


def _collapse(node: ir.Node, layout: Layout, p: PhasePlan | None) -> Layout:
    """Upsampling: drop the outermost levels whose phases are now whole steps apart."""
    g_out = node.outputs[0].meta.get(GRID)
    if g_out is None or g_out.axes is None:
        raise UnsupportedNodeError(node, "upsampling computed per phase with no known output grid")
    step = g_out.stride
    keep = len(layout)
    while keep > 0:
        lvl = layout[keep - 1]
        hit = [f > 1 and sh % S == 0 for f, sh, S in zip(lvl.factor, lvl.shift, step)]
        moving = [f > 1 for f in lvl.factor]
        if not any(hit):
            break
        if hit != moving:
            raise UnsupportedNodeError(
                node, f"upsamples so that phases of the removed stride {'x'.join(map(str, lvl.factor))} coincide on "
                "some axes but not on others", "choose another output stride",
            )
        keep -= 1
    kept = layout[:keep]
    est = tuple(math.prod(l.factor[t] for l in kept) for t in range(len(step)))
    if est != tuple(g_out.est):
        raise UnsupportedNodeError(
            node, f"upsamples at eST {'x'.join(map(str, g_out.est))} by a factor that splits the phases of a removed "
            f"stride unevenly (levels {_describe(layout)})", "choose another output stride",
        )
    return kept


# Ops whose attribute ``axis`` (default) or ``axes`` must not include the batch axis.
_AXIS_OPS = {
    "Concat": 0, "Split": 0, "Gather": 0, "Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "ArgMax": 0,
    "ArgMin": 0, "TopK": -1, "LpNormalization": -1, "GatherElements": 0,
}


def _check_batch_axis(node: ir.Node) -> None:
    """Ops after a split must treat batch entries (phases) independently."""
    op = node.op_type
    rank = node.inputs[0].shape.rank() if node.inputs and node.inputs[0] is not None and node.inputs[0].shape else None

    def refuse(what: str):
        raise UnsupportedNodeError(
            node, f"{what} acts on the batch axis, which holds the phases under --strategy fragments",
            "cut before it with --outputs, or use --strategy dilate",
        )

    if op in _AXIS_OPS:
        axis = node.attributes.get_int("axis", _AXIS_OPS[op])
        if rank is not None and _ir.normalise_axis(axis, rank) == 0:
            refuse(op)
    elif op == "Transpose":
        perm = node.attributes.get_ints("perm")
        if perm is None or perm[0] != 0:
            refuse("Transpose that moves the batch axis")
    elif op == "Flatten":
        if node.attributes.get_int("axis", 1) == 0:
            refuse("Flatten with axis=0")
    elif op.startswith("Reduce") or op in ("Squeeze", "Unsqueeze"):
        axes = node.attributes.get_ints("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            arr = _ir.const_array(node.inputs[1])
            axes = None if arr is None else arr.reshape(-1).tolist()
        if op.startswith("Reduce") and not axes:
            if not node.attributes.get_int("noop_with_empty_axes", 0):
                refuse(f"{op} over every axis")
            return
        if axes is None:
            if op == "Squeeze":
                refuse("Squeeze without axes")
            return
        r = rank if op != "Unsqueeze" else (rank or 0) + len(axes)
        if r and any(_ir.normalise_axis(int(a), r) == 0 for a in axes):
            refuse(op)
    elif op == "Slice" and len(node.inputs) >= 3:
        axes = _ir.const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        starts = _ir.const_array(node.inputs[1])
        ends = _ir.const_array(node.inputs[2])
        if axes is None and starts is not None:
            axes = np.arange(len(starts.reshape(-1)))
        if axes is not None and rank is not None and starts is not None and ends is not None:
            for a, st, en in zip(axes.reshape(-1), starts.reshape(-1), ends.reshape(-1)):
                if _ir.normalise_axis(int(a), rank) == 0 and (int(st) != 0 or int(en) < INT64_MAX // 2):
                    refuse("Slice")


def plan(model: ir.Model) -> PhasePlan:
    """Layouts with unneeded levels pruned: a level no output keeps is never created."""
    disabled: frozenset = frozenset()
    for _ in range(8):
        p = _plan(model, disabled)
        needed = {lvl for _, layout in p.outputs for lvl in layout}
        unneeded = {lvl for _, lvl in p.splits if lvl not in needed}
        if not unneeded:
            return p
        disabled = disabled | unneeded
    return p


def reshape_batch_target(node: ir.Node) -> np.ndarray | None:
    """A Reshape target that bakes the traced batch: the target that takes it from the running
    tensor (0 or -1); None when there is nothing to change (computed at run time, from Shape)."""
    target = _ir.const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is None:
        return None
    target = target.reshape(-1).astype(np.int64)
    if len(target) == 0 or target[0] in (0, -1):
        return None
    in_dims = _ir.static_dims(node.inputs[0])
    if in_dims is None or in_dims[0] is None or int(target[0]) != int(in_dims[0]):
        raise UnsupportedNodeError(node, "reshapes the batch axis, which holds the phases under --strategy fragments")
    new = target.copy()
    allowzero = node.attributes.get_int("allowzero", 0)
    # 0 copies the running batch, so other baked sizes (a GroupNorm's [1, C, H, W] of the export)
    # still fail at another size, as in the original; -1 would take the extra positions into
    # the batch and return a wrong output
    if not allowzero:
        new[0] = 0
    elif -1 not in target[1:]:
        new[0] = -1
    else:
        raise UnsupportedNodeError(node, "Reshape with allowzero=1 and a baked batch size")
    return new


def resize_batch_fix(node: ir.Node) -> tuple | None:
    """How a Resize of a tensor of phases keeps its output batch its input's.

    Constant sizes (baked batch and image size) -> ``("ratio", r)``: Shape(x) * integer ratio.
    Sizes computed at run time (read from another tensor, e.g. the input before a collapse's
    batch slice, or a baked batch 1 next to a Shape) -> ``("entry", 3, k)``: entry k from
    Shape(x); computed scales -> ``("entry", 2, k)``: a batch scale of 1. Constant scales must
    already scale the batch by 1 (None: nothing to change).
    """
    if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name:
        if _ir.const_array(node.inputs[3]) is None:
            k = _batch_index(node)
            return None if k is None else ("entry", 3, k)
    elif len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        scales = _ir.const_array(node.inputs[2])
        if scales is None:
            k = _batch_index(node)
            return None if k is None else ("entry", 2, k)
        if scales.size and _batch_index(node) is not None and float(scales.reshape(-1)[_batch_index(node)]) != 1.0:
            raise UnsupportedNodeError(
                node, "Resize that scales the batch axis, which holds the phases under --strategy fragments"
            )
        return None
    else:
        return None
    sizes = _ir.const_array(node.inputs[3])
    sizes = sizes.reshape(-1).astype(np.int64)
    in_dims = _ir.static_dims(node.inputs[0])
    axes = node.attributes.get_ints("axes")
    if in_dims is None or any(d is None for d in in_dims) or axes is not None or len(sizes) != len(in_dims):
        raise UnsupportedNodeError(node, "Resize to constant sizes that cannot be related to its input's shape")
    if any(s % d for s, d in zip(sizes, in_dims)):
        raise UnsupportedNodeError(node, "Resize to constant sizes that are not integer multiples of its input's")
    return ("ratio", np.array([s // d for s, d in zip(sizes, in_dims)], dtype=np.int64))


def _batch_index(node: ir.Node) -> int | None:
    """Where the batch axis is in a Resize's sizes/scales (None: not resized, opset-18 ``axes``)."""
    axes = node.attributes.get_ints("axes")
    if axes is None:
        return 0
    rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
    if rank is None:
        raise UnsupportedNodeError(node, "Resize with axes of an input of unknown rank, computed per phase")
    norm = [_ir.normalise_axis(int(a), rank) for a in axes]
    return norm.index(0) if 0 in norm else None


def check_output_of_phases(value: ir.Value) -> Grid:
    """An output computed per phase must have a known layout and rank to be interleaved back."""
    g: Grid | None = value.meta.get(GRID)
    producer = value.producer()
    if g is None or g.axes is None:
        raise UnsupportedNodeError(producer, f"output '{value.name}' is computed per phase but has no known spatial layout")
    if value.shape is None:
        raise UnsupportedNodeError(producer, f"output '{value.name}' computed per phase has no known rank")
    return g
