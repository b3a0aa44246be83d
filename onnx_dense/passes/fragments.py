"""Rewrite, strategy "fragments": the dense mapping as the original network run once per phase.

Where the analysis removes a factor f = s/s' of a node's stride s (keeping s'), dense position
``j = a + f*i`` (phase a in [0, f)) of that node's output is the original window at
``i*s + a*s' - p``. So phase a is the original node (stride s, its pads made explicit) applied
to its padded input shifted by ``a*s'`` positions. This pass runs the node at stride s' (dense
window ``a + f*i`` is phase a's window i), moves every phase to the batch axis (space-to-batch:
Reshape/Transpose), runs everything downstream unchanged on batch ``N * prod(f)``, and at every
dense output
interleaves the phases back (Reshape, Transpose, Reshape: batch-to-space). A node downstream
that removes another factor adds a level: with levels f1 (first) and f2, output position
``j = a1 + f1*(a2 + f2*i)``. The batch is phase-major, the last level outermost:
``batch = ((a_m * F_{m-1} + ...) + a_1) * N + n`` with a_k the row-major phase index of level k.

Because every phase is the original network, global pooling, squeeze-and-excitation,
InstanceNorm and upsampling need nothing: they run per phase.

Rules:

* Level of a removal node: factor f = s/s' and shift = s' * (input-pixel stride of its input)
  per spatial axis; shifts grow along a path (each is a multiple of the previous level's
  shift times its factor).
* Space-to-batch of the output (Conv, and pools without ceil_mode; ``check_split_after``): the
  node's stride becomes s', its end pads grow by the extension ``(f-1)*s'`` (zeros counted, or
  ignored, as its own pads are); of its dense output's ``D`` windows per axis the first
  ``f*(D//f)`` are kept (``D//f`` = phase 0's number of windows, which every phase gets), then
  each phase axis in turn moves to the front of the batch ([Q, f, R] -> [f, Q, R] transposes,
  which ORT copies in runs; one 6-D transpose was ~5x slower). The move goes after the chain of
  pointwise ops that follows the node (activations, BatchNormalization, per-channel constants,
  1x1 convs; one consumer each, no graph output), at its narrowest tensor, so ORT keeps its
  Conv + activation fusions and copies the least.
* Space-to-batch of the input (ceil_mode pools: a phase's partial last window is clipped at that
  phase's own end): Pad by the node's pads plus ``(f-1)*s'`` at the end (zeros; the lowest finite
  value for MaxPool), phase a = Slice ``[a*s', a*s' + L_padded)``, so every phase has phase 0's
  number of windows, phase 0 (= the original) included. The node's own pads become 0. An
  AveragePool that does not count pads divides by the same pool over a mask of ones.
* Upsampling (Resize, Upsample, DepthToSpace, strided ConvTranspose) to per-phase stride S:
  a level whose shift is a multiple of S now repeats its phase 0 a whole step further on, so
  the outermost such levels are dropped (the batch is sliced to its first block, before the
  upsampling); what remains must match the analysis' eST (else: refused, uneven split).
  Levels no output keeps are not created at all (their node keeps its stride): a U-Net's
  bottleneck is computed once per *kept* phase.
* Operands of one node must carry the same levels, and so the same batch. Ops that act on the
  batch axis (Concat, Split, Gather, Slice, reductions, Softmax, Transpose, Flatten at axis 0
  ...) are refused downstream of a split: they would mix phases.
* Shape vectors count phases too: Shape/Size of a tensor of phases tags the vector (and the
  shape arithmetic after it) with that tensor's levels. A Reshape/Expand/Tile whose shape
  operand carries other levels than its data (read from another branch, or from before an
  upsampling's batch slice) is refused. A Resize of a tensor of phases never resizes the
  batch: sizes computed at run time (tf2onnx's UpSampling2D reads them from Shape of the
  input before the slice; keras-deeplab's image pooling bakes batch 1) get their batch entry
  from Shape of the tensor it runs on, computed scales a batch scale of 1; constant scales
  that change the batch are refused.
* Reshapes that keep the spatial block take its dims from the running tensor (the analysis'
  ReshapePlans, applied by densify_reshapes.py as under dilation); other Reshape targets that
  bake the traced batch size (dynamo's ``[1, 128]``) take it from the running tensor (0 or
  -1); constant Resize ``sizes`` become ``Shape(x) * ratio``.
* Pools left as they were whose normalised pads reach their kernel (ceil_mode's extra end pad
  can make them so; onnxruntime refuses such pools): the pads move to a Pad node (the lowest
  value for MaxPool, zeros for AveragePool, divided by the same pool over a padded mask of ones
  where pads are not counted); LpPool is refused.
* Outputs: one Reshape/Transpose/Reshape undoes every level. Outputs with no spatial axes
  (classifier heads) get them appended first: (N, K) -> (N, K, e_h, e_w), one prediction per
  phase, the same layout as the dilated head.
* Metadata (``DenseInfo.batches``, what a run needs to take the batch one phase of a level at a
  time: runtime/fragment_batches.py): per level, its factor, the tensors of phases its moves
  make, and the maps they read (``sources``: spatial axes, dense stride, receptive field, and
  ``every``: the moves take every f-th position of the map, as those after a node's output
  do). A run tiles the trunk up to the first level's maps, and where ``every`` holds does the
  moves itself, in numpy, one array per phase.

What is exact (also in the README):

* Phase 0 (the subgrid verify checks) is the original network, always, at every input size.
* When every level divides (each phase of each level has as many windows as phase 0, e.g. a
  3x3/2 conv with pad 1 on an even map), the output equals the dilated model everywhere.
* Otherwise the last window of a later phase reaches the zero extension; values computed from
  it differ from the original run on the shifted input. Off-grid positions are exact wherever
  their receptive field stays inside the image (metadata ``off_grid: "interior"``; verify
  --phases leaves out both borders). Global context (GAP, SE, InstanceNorm) averages over the
  phase's whole map, extension included (``off_grid: "global"``: no phase check).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import onnx_ir as ir

from onnx_dense import metadata
from onnx_dense.errors import UnsupportedNodeError
from onnx_dense.grid import PLAN
from onnx_dense.passes import _ir
from onnx_dense.passes.analysis.phases import check_output_of_phases, reshape_batch_target, resize_batch_fix
from onnx_dense.passes.plans import PHASES, Layout, Level, PhasePlan, SpatialPlan

INT64_MAX = np.iinfo(np.int64).max
STRATEGY = "fragments"


class SplitIntoPhases(ir.passes.InPlacePass):
    """Apply the plan: space-to-batch at removal nodes, collapses, batch fixes, batch-to-space."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        editor = _ir.Editor(graph)
        p: PhasePlan = model.meta[PHASES]  # planned in the analysis step (passes/analysis/phases.py)
        # read before any split rewires the graph: how many levels the node's input carries
        depth = {id(node): len(p.layouts.get(node.inputs[0], ())) for node, _ in p.splits}
        replaced: dict[ir.Value, ir.Value] = {}  # graph outputs a division by a count took over
        for node, level in p.splits:
            made, source = _split_after(graph, editor, node, level, p)
            every = bool(made)  # the tensor of phases is every f-th position of the map, phase-major
            if not made:
                source = node.inputs[0]  # before _split puts the shifted copies in its place
                made = _split(graph, editor, node, level, replaced)
            p.cuts.setdefault(depth[id(node)], []).extend(made)  # where a run can split the batch
            p.sources.setdefault(depth[id(node)], []).append((source, made, every))  # what the moves read
        for node, dropped in p.collapses:
            _keep_first_block(graph, editor, node, dropped)
        for node in p.reshapes:
            _note_baked_map_size(model, node)
            _batch_from_input(graph, editor, node)
        for node in p.resizes:
            _resize_sizes(graph, editor, node)
        for node in list(graph):  # pools left as they were, whose normalised pads reach their kernel
            if node.op_type in ("MaxPool", "AveragePool", "LpPool") and node.domain in ("", "ai.onnx"):
                _legal_pool_pads(graph, editor, node, replaced)
        for value, layout in p.outputs:
            _interleave(graph, editor, replaced.get(value, value), layout, _ir.opset(model), p)
        return ir.passes.PassResult(model, True)


def _lowest(dtype) -> float:
    return float(np.finfo(dtype).min) if np.issubdtype(dtype, np.floating) else float(np.iinfo(dtype).min)


def _split(graph: ir.Graph, editor: _ir.Editor, node: ir.Node, level: Level,
           replaced: dict[ir.Value, ir.Value]) -> list[ir.Value]:
    """Space-to-batch of the node's input; returns the tensors of phases made (the input's,
    and a mask's for an AveragePool that does not count pads)."""
    plan: SpatialPlan = node.meta[PLAN]
    params = plan.params
    x = node.inputs[0]
    rank = x.shape.rank()
    n = len(params.kernel)
    base = f"{node.name or node.op_type}_phases"
    dtype = _ir.numpy_dtype(x)
    ext = tuple((f - 1) * k for f, k in zip(level.factor, plan.kept))
    nodes: list[ir.Node] = []
    value = _lowest(dtype) if node.op_type == "MaxPool" else 0.0
    lead = (0,) * (rank - n)

    def phases_of(t: ir.Value, name: str) -> ir.Value:
        padded = editor.pad(
            nodes, t, lead + tuple(params.pads_begin), lead + tuple(pe + e for pe, e in zip(params.pads_end, ext)),
            base=f"{name}_pad", value=value, dtype=dtype,
        )
        axes = editor.const(nodes, np.arange(rank - n, rank, dtype=np.int64), base=f"{name}_axes")
        parts = []
        for a in itertools.product(*(range(f) for f in level.factor)):
            starts = [ai * k for ai, k in zip(a, plan.kept)]
            ends = [st - e if st - e < 0 else INT64_MAX for st, e in zip(starts, ext)]
            s = editor.const(nodes, np.array(starts, dtype=np.int64), base=f"{name}_start")
            e = editor.const(nodes, np.array(ends, dtype=np.int64), base=f"{name}_end")
            parts.append(editor.op(nodes, "Slice", [padded, s, e, axes], base=f"{name}_{'_'.join(map(str, a))}"))
        return editor.op(nodes, "Concat", parts, {"axis": 0}, base=name)

    stacked = phases_of(x, base)
    made = [stacked]
    node.replace_input_with(0, stacked)
    _ir.set_ints(node, "pads", (0,) * (2 * n))
    uncounted = (
        node.op_type == "AveragePool"
        and not node.attributes.get_int("count_include_pad", 0)
        and any(params.pads_begin + params.pads_end)
    )
    if uncounted:  # phases padded by hand: divide by the same pool over a mask of real pixels
        _ir.set_int(node, "count_include_pad", 1)
        value = 0.0
        mask = phases_of(_ones_like(editor, nodes, x, rank, base), f"{base}_mask")
        made.append(mask)
    graph.insert_before(node, nodes)
    if uncounted:
        _divide_by_count(graph, editor, node, mask, base, replaced)
    return made


def _ones_like(editor: _ir.Editor, nodes: list[ir.Node], x: ir.Value, rank: int, base: str) -> ir.Value:
    """Ones of ``x``'s batch and spatial size, one channel: the real pixels, before any padding."""
    dtype = _ir.numpy_dtype(x)
    shape = editor.op(nodes, "Shape", [x], base=f"{base}_shape")
    batch = _slice1(editor, nodes, shape, 0, 1, f"{base}_batch")
    spatial = _slice1(editor, nodes, shape, 2, rank, f"{base}_spatial")
    one = editor.const(nodes, np.array([1], dtype=np.int64), base=f"{base}_one")
    mask_shape = editor.op(nodes, "Concat", [batch, one, spatial], {"axis": 0}, base=f"{base}_mask_shape")
    return editor.op(
        nodes, "ConstantOfShape", [mask_shape], {"value": ir.tensor(np.array([1], dtype=dtype), name=f"{base}_1")},
        base=f"{base}_mask",
    )


def _divide_by_count(graph: ir.Graph, editor: _ir.Editor, node: ir.Node, mask: ir.Value, base: str,
                     replaced: dict[ir.Value, ir.Value]) -> None:
    """An AveragePool that now counts the pads it was given by hand: its output divided by the
    same pool over ``mask`` (ones on real pixels, padded the same way). A graph output it was
    is now the division's (``replaced``: old -> new)."""
    attrs = {k: a.value for k, a in node.attributes.items()}
    after: list[ir.Node] = []
    count = editor.op(after, "AveragePool", [mask], attrs, base=f"{base}_count")
    out = node.outputs[0]
    users = list(out.uses())
    ratio = editor.op(after, "Div", [out, count], base=f"{base}_mean")
    graph.insert_after(node, after)
    ratio.shape, ratio.type = out.shape, out.type
    for key, val in out.meta.items():  # its grid: what the batch-to-space of an output reads
        ratio.meta[key] = val
    for use in users:
        use.node.replace_input_with(use.idx, ratio)
    if out.is_graph_output():  # the output (and its name) is the division's; the Div still reads ``out``
        _ir.take_output(graph, out, ratio)
        replaced[out] = ratio


def _legal_pool_pads(graph: ir.Graph, editor: _ir.Editor, node: ir.Node, replaced: dict[ir.Value, ir.Value]) -> None:
    """A pool whose pads reach its kernel (onnxruntime refuses them, FIELD-NOTES; ceil_mode's
    extra end pad can make them so) reads them from a Pad node instead: the lowest value for
    MaxPool, zeros for AveragePool, divided by a count of real pixels where pads are not counted."""
    kernel = tuple(node.attributes.get_ints("kernel_shape") or ())
    pads = tuple(node.attributes.get_ints("pads") or ())
    if not kernel or not pads or all(p < k for p, k in zip(pads, kernel * 2)):
        return
    if node.op_type == "LpPool":
        raise UnsupportedNodeError(node, "LpPool whose pads reach its kernel size (onnxruntime refuses them)")
    x = node.inputs[0]
    n = len(kernel)
    rank = x.shape.rank() if x.shape is not None else n + 2
    lead = (0,) * (rank - n)
    dtype = _ir.numpy_dtype(x)
    base = f"{node.name or node.op_type}_legal"
    nodes: list[ir.Node] = []
    begin, end = lead + pads[:n], lead + pads[n:]
    value = _lowest(dtype) if node.op_type == "MaxPool" else 0.0
    padded = editor.pad(nodes, x, begin, end, base=f"{base}_pad", value=value, dtype=dtype)
    uncounted = node.op_type == "AveragePool" and not node.attributes.get_int("count_include_pad", 0)
    if uncounted:
        ones = _ones_like(editor, nodes, x, rank, base)
        mask = editor.pad(nodes, ones, begin, end, base=f"{base}_mask_pad", value=0.0, dtype=dtype)
    graph.insert_before(node, nodes)
    node.replace_input_with(0, padded)
    _ir.set_ints(node, "pads", (0,) * (2 * n))
    if uncounted:
        _ir.set_int(node, "count_include_pad", 1)
        _divide_by_count(graph, editor, node, mask, base, replaced)


# Ops that act on each position alone (given constant per-channel operands): the
# batch-to-space of _split_after commutes with them, so it goes after them and ORT can still
# fuse them into the node (Conv + BatchNormalization / Relu / Clip ...).
_POINTWISE = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign",
    "Mish", "Neg", "Abs", "Identity", "ThresholdedRelu", "Erf", "Exp", "Sqrt", "Reciprocal", "Gelu",
})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"})


def check_split_after(node: ir.Node) -> str | None:
    """Why a removal node cannot run at its kept stride followed by a space-to-batch of its output."""
    if node.op_type not in ("Conv", "MaxPool", "AveragePool"):
        return f"{node.op_type} is not a Conv or pool"
    if node.attributes.get_int("ceil_mode", 0):
        return "ceil_mode: a phase's partial last window is clipped at that phase's own end"
    if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", ""):
        return "auto_pad is not explicit"
    if node.outputs[0].is_graph_output():
        return "its output is a graph output"
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return "MaxPool indices are used"
    if node.inputs[0] is None or node.inputs[0].shape is None:
        return "input rank unknown"
    return None


def _pointwise(node: ir.Node, value: ir.Value, rank: int, lead: int) -> bool:
    """``node`` maps ``value`` position by position (other operands constant per channel)."""
    if len(node.outputs) != 1 or node.domain not in ("", "ai.onnx"):
        return False
    others = [v for i, v in enumerate(node.inputs) if v is not None and not (v is value and i == _data_index(node, value))]
    if node.op_type in _POINTWISE:
        return node.inputs[0] is value and not others
    if node.op_type == "Clip":
        return node.inputs[0] is value and all(_ir.const_array(v) is not None for v in others)
    if node.op_type == "BatchNormalization":
        return node.inputs[0] is value and lead >= 2 and all(
            (a := _ir.const_array(v)) is not None and a.ndim == 1 for v in others
        )
    if node.op_type == "Conv":  # 1x1, stride 1, no pads: a per-position matrix product
        w = node.inputs[1] if len(node.inputs) > 1 else None
        return (
            node.inputs[0] is value and w is not None and w.const_value is not None and lead == 2
            and all(k == 1 for k in w.const_value.shape[2:])
            and all(v == 1 for v in (node.attributes.get_ints("strides") or (1,)))
            and not any(node.attributes.get_ints("pads") or ())
            and node.attributes.get_string("auto_pad", "NOTSET") in ("NOTSET", "", "VALID")
            and all(_ir.const_array(v) is not None for v in node.inputs[2:] if v is not None)
        )
    if node.op_type in _BINARY and len(node.inputs) == 2 and len(others) == 1:
        a = _ir.const_array(others[0])
        if a is None or a.ndim > rank:
            return False
        dims = (1,) * (rank - a.ndim) + a.shape  # right-aligned broadcast
        return dims[0] == 1 and all(d == 1 for d in dims[lead:])
    return False


def _channels(value: ir.Value) -> float:
    """Axis 1 at the analysis size (unknown: infinite, never preferred)."""
    dims = _ir.static_dims(value)
    return dims[1] if dims is not None and len(dims) > 1 and dims[1] is not None else math.inf


def _data_index(node: ir.Node, value: ir.Value) -> int:
    return next(i for i, v in enumerate(node.inputs) if v is value)


def _split_after(graph: ir.Graph, editor: _ir.Editor, node: ir.Node, level: Level,
                 p: PhasePlan) -> tuple[list[ir.Value], ir.Value | None]:
    """Space-to-batch of the node's *output*: run it at its kept stride s' (every phase's windows
    at once: dense window ``j = a + f*i`` is phase a's window i), then move every f-th position to
    the batch with one Reshape/Transpose/Reshape. Same windows as ``_split`` (the node's pads grow
    by the extension ``(f-1)*s'`` at the end, zeros counted or ignored as the node's own pads
    are), one copy of the output instead of f^2 shifted copies of the input. Returns the tensor of
    phases made and the map it moves; ([], None) (nothing changed) where check_split_after gives a reason."""
    if check_split_after(node) is not None:
        return [], None
    plan: SpatialPlan = node.meta[PLAN]
    params = plan.params
    rank = node.inputs[0].shape.rank()
    n = len(params.kernel)
    lead = rank - n
    ext = tuple((f - 1) * k for f, k in zip(level.factor, plan.kept))
    pads_end = tuple(pe + e for pe, e in zip(params.pads_end, ext))
    if node.op_type != "Conv" and any(pe >= k for pe, k in zip(pads_end, params.kernel)):
        return [], None  # onnxruntime's pools take pads below the kernel only: the input's split serves
    _ir.set_ints(node, "strides", tuple(plan.kept))
    _ir.set_ints(node, "pads", tuple(params.pads_begin) + pads_end)
    if node.op_type == "AveragePool" and not any(params.pads_begin + params.pads_end):
        _ir.set_int(node, "count_include_pad", 1)  # no pads of its own: the extension counts, as in _split
    # The space-to-batch may go after any chain of pointwise ops that follows (single consumer,
    # no graph output): it goes where the tensor is smallest (a 1x1 conv that narrows it), the
    # latest such place (keeps ORT's Conv + activation fusions).
    y = node.outputs[0]
    chain = [y]
    while True:
        uses = list(y.uses())
        if len(uses) != 1 or y.is_graph_output():
            break
        user = uses[0].node
        if not _pointwise(user, y, rank, lead) or user.outputs[0].is_graph_output():
            break
        y = user.outputs[0]
        chain.append(y)
    y = min(reversed(chain), key=_channels)
    users = list(y.uses())
    base = f"{node.name or node.op_type}_phases"
    nodes: list[ir.Node] = []
    factor = np.array(level.factor, dtype=np.int64)
    shape = editor.op(nodes, "Shape", [y], base=f"{base}_shape")
    dense = _slice1(editor, nodes, shape, lead, rank, f"{base}_dense")
    f = editor.const(nodes, factor, base=f"{base}_factor")
    windows = editor.op(nodes, "Div", [dense, f], base=f"{base}_windows")  # phase 0's (= every phase's)
    keep = editor.op(nodes, "Mul", [windows, f], base=f"{base}_keep")
    zeros = editor.const(nodes, np.zeros(n, dtype=np.int64), base=f"{base}_zeros")
    axes = editor.const(nodes, np.arange(lead, rank, dtype=np.int64), base=f"{base}_axes")
    kept = editor.op(nodes, "Slice", [y, zeros, keep, axes], base=f"{base}_kept")
    # Each phase axis in turn, last first, moves to the front: a [Q, f, R] -> [f, Q, R] transpose
    # that ORT copies in runs of R (a single 6-D transpose is ~5x slower there).
    moved = kept
    for t in reversed(range(n)):
        if level.factor[t] == 1:
            continue
        head = editor.const(nodes, np.array([-1, level.factor[t]], dtype=np.int64), base=f"{base}_q{t}")
        rest = _product(editor, nodes, windows, t + 1, n, f"{base}_r{t}") if t + 1 < n else None  # later windows
        if rest is not None:
            target = editor.op(nodes, "Concat", [head, rest], {"axis": 0}, base=f"{base}_s{t}")
        else:
            target = head
        folded = editor.op(nodes, "Reshape", [moved, target], base=f"{base}_fold{t}")
        perm = [1, 0, 2] if rest is not None else [1, 0]
        moved = editor.op(nodes, "Transpose", [folded], {"perm": perm}, base=f"{base}_move{t}")
    minus1 = editor.const(nodes, np.array([-1], dtype=np.int64), base=f"{base}_batch")
    parts = [minus1] + ([_slice1(editor, nodes, shape, 1, lead, f"{base}_channels")] if lead > 1 else []) + [windows]
    merged_shape = editor.op(nodes, "Concat", parts, {"axis": 0}, base=f"{base}_merged_shape")
    out = editor.op(nodes, "Reshape", [moved, merged_shape], base=base)
    out.shape, out.type = y.shape, y.type
    for key, val in y.meta.items():
        out.meta[key] = val
    if y in p.layouts:
        p.layouts[out] = p.layouts[y]
    graph.insert_after(y.producer(), nodes)
    for use in users:
        use.node.replace_input_with(use.idx, out)
    return [out], y


def _product(editor, nodes, vec: ir.Value, lo: int, hi: int, base: str) -> ir.Value:
    """``prod(vec[lo:hi])`` as a 1-element vector (a chain of Mul: no opset-dependent ReduceProd)."""
    out = _slice1(editor, nodes, vec, lo, lo + 1, f"{base}_{lo}")
    for i in range(lo + 1, hi):
        out = editor.op(nodes, "Mul", [out, _slice1(editor, nodes, vec, i, i + 1, f"{base}_{i}")], base=f"{base}_mul")
    return out


def _slice1(editor, nodes, vec: ir.Value, lo: int, hi: int, base: str) -> ir.Value:
    s = editor.const(nodes, np.array([lo], dtype=np.int64), base=f"{base}_from")
    e = editor.const(nodes, np.array([hi], dtype=np.int64), base=f"{base}_to")
    return editor.op(nodes, "Slice", [vec, s, e], base=base)


def _keep_first_block(graph: ir.Graph, editor: _ir.Editor, node: ir.Node, dropped: int) -> None:
    """Before an upsampling node: keep the batch entries of phase 0 of the dropped levels."""
    x = node.inputs[0]
    base = f"{node.name or node.op_type}_phase0"
    nodes: list[ir.Node] = []
    shape = editor.op(nodes, "Shape", [x], base=f"{base}_shape")
    batch = _slice1(editor, nodes, shape, 0, 1, f"{base}_batch")
    div = editor.const(nodes, np.array([dropped], dtype=np.int64), base=f"{base}_levels")
    end = editor.op(nodes, "Div", [batch, div], base=f"{base}_end")
    zero = editor.const(nodes, np.array([0], dtype=np.int64), base=f"{base}_zero")
    axis = editor.const(nodes, np.array([0], dtype=np.int64), base=f"{base}_axis")
    kept = editor.op(nodes, "Slice", [x, zero, end, axis], base=base)
    kept.shape, kept.type = x.shape, x.type
    graph.insert_before(node, nodes)
    node.replace_input_with(0, kept)


def _note_baked_map_size(model: ir.Model, node: ir.Node) -> None:
    """A Reshape whose constant target gives its output's spatial axes (dynamo's GroupNorm
    restores [1, C, H, W] of the export) runs only at the export size, as in the original:
    one line for the summary and the dense model's metadata (DenseInfo.fixed_sizes)."""
    from onnx_dense.grid import GRID
    from onnx_dense.passes.rederive_sizes import SIZE_LIMITS, SIZE_NOTES

    target = _ir.const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    g = node.outputs[0].meta.get(GRID)
    if target is None or g is None or not g.axes:
        return
    target = target.reshape(-1)
    if all(0 <= a < len(target) and int(target[a]) > 0 for a in g.axes):
        line = (f"Reshape '{node.name or '<unnamed>'}' reshapes to {'x'.join(str(int(t)) for t in target)}, a map size "
                "baked in at export")
        model.meta.setdefault(SIZE_LIMITS, []).append(line)
        model.meta.setdefault(SIZE_NOTES, []).append(f"{line}: the original and the dense model run only at the export size")


def _batch_from_input(graph: ir.Graph, editor: _ir.Editor, node: ir.Node) -> None:
    """A Reshape target that bakes the traced batch takes it from the running tensor."""
    new = reshape_batch_target(node)
    if new is None:
        return
    nodes: list[ir.Node] = []
    node.replace_input_with(1, editor.const(nodes, new, base=f"{node.name or 'Reshape'}_phase_batch"))
    graph.insert_before(node, nodes)


def _resize_sizes(graph: ir.Graph, editor: _ir.Editor, node: ir.Node) -> None:
    """Resize of a tensor of phases: its output batch must be its input's (phases.resize_batch_fix)."""
    fix = resize_batch_fix(node)
    if fix is None:
        return
    if fix[0] == "entry":
        _replace_batch_entry(graph, editor, node, fix[1], fix[2])
        return
    ratio = fix[1]
    nodes: list[ir.Node] = []
    base = f"{node.name or 'Resize'}_sizes"
    shape = editor.op(nodes, "Shape", [node.inputs[0]], base=f"{base}_shape")
    r = editor.const(nodes, ratio, base=f"{base}_ratio")
    new = editor.op(nodes, "Mul", [shape, r], base=base)
    graph.insert_before(node, nodes)
    node.replace_input_with(3, new)


def _replace_batch_entry(graph: ir.Graph, editor: _ir.Editor, node: ir.Node, i: int, k: int) -> None:
    """Resize sizes (i = 3) or scales (i = 2) computed at run time: batch entry k = Shape(x)[0] or 1."""
    vec = node.inputs[i]
    nodes: list[ir.Node] = []
    base = f"{node.name or 'Resize'}_phase_{'sizes' if i == 3 else 'scales'}"
    if i == 3:
        shape = editor.op(nodes, "Shape", [node.inputs[0]], base=f"{base}_shape")
        entry = _slice1(editor, nodes, shape, 0, 1, f"{base}_batch")
    else:
        entry = editor.const(nodes, np.array([1.0], dtype=_ir.numpy_dtype(vec)), base=f"{base}_one")
    parts = [entry]
    if k > 0:
        parts.insert(0, _slice1(editor, nodes, vec, 0, k, f"{base}_before"))
    parts.append(_slice1(editor, nodes, vec, k + 1, INT64_MAX, f"{base}_after"))
    new = editor.op(nodes, "Concat", parts, {"axis": 0}, base=base)
    graph.insert_before(node, nodes)
    node.replace_input_with(i, new)


def _interleave(graph: ir.Graph, editor: _ir.Editor, value: ir.Value, layout: Layout, opset: int,
                p: PhasePlan) -> None:
    """Batch-to-space for one graph output: undo every level at once. What it does is also
    recorded in ``p.interleaved`` (the runtime does the same in numpy, one phase of a level at
    a time: runtime/fragment_batches.py)."""
    g = check_output_of_phases(value)
    name = value.name
    nodes: list[ir.Node] = []
    rank = value.shape.rank()
    y = value
    base = f"{name}_interleave"
    n = g.rank
    if g.inserted:  # (B, K) -> (B, K, 1, 1): one prediction per phase
        new_axes = np.arange(rank, rank + n, dtype=np.int64)
        if opset >= 13:
            axes = editor.const(nodes, new_axes, base=f"{base}_axes")
            y = editor.op(nodes, "Unsqueeze", [y, axes], base=f"{base}_unsqueeze")
        else:
            y = editor.op(nodes, "Unsqueeze", [y], {"axes": new_axes.tolist()}, base=f"{base}_unsqueeze")
        spatial = tuple(range(rank, rank + n))
        rank += n
    else:
        spatial = tuple(g.axes)
    if not layout:  # nothing split (eST 1): the head's (B, K, 1, 1) is the output
        graph.extend(nodes)
        index = next(i for i, v in enumerate(graph.outputs) if v is value)
        value.name = f"{name}_phases"
        y.name = name
        y.type = value.type
        graph.outputs[index] = y
        return
    p.interleaved[name] = {
        "phases": f"{name}_phases", "levels": [list(lvl.factor) for lvl in layout], "axes": list(spatial),
        "inserted": bool(g.inserted),
    }
    m = len(layout)
    factors = [f for lvl in reversed(layout) for f in lvl.factor]  # outermost level first
    total = math.prod(lvl.phases for lvl in layout)
    shape = editor.op(nodes, "Shape", [y], base=f"{base}_shape")
    rest = _slice1(editor, nodes, shape, 1, rank, f"{base}_rest")
    head = editor.const(nodes, np.array(factors + [-1], dtype=np.int64), base=f"{base}_phases")
    split = editor.op(nodes, "Concat", [head, rest], {"axis": 0}, base=f"{base}_split_shape")
    y = editor.op(nodes, "Reshape", [y, split], base=f"{base}_split")
    # axes now: level k (0 = outermost) axis t at k*n + t; batch at m*n; original axis i >= 1 at m*n + i
    perm = [m * n]
    for i in range(1, rank):
        perm.append(m * n + i)
        if i in spatial:
            t = spatial.index(i)
            perm.extend(k * n + t for k in range(m))
    y = editor.op(nodes, "Transpose", [y], {"perm": perm}, base=f"{base}_order")
    mul = np.ones(rank, dtype=np.int64)
    for t, a in enumerate(spatial):
        mul[a] = math.prod(lvl.factor[t] for lvl in layout)
    div = np.ones(rank, dtype=np.int64)
    div[0] = total
    scaled = editor.op(nodes, "Mul", [shape, editor.const(nodes, mul, base=f"{base}_mul")], base=f"{base}_dims")
    target = editor.op(nodes, "Div", [scaled, editor.const(nodes, div, base=f"{base}_div")], base=f"{base}_target")
    value.name = f"{name}_phases"
    y = editor.op(nodes, "Reshape", [y, target], base=f"{base}_merge")
    graph.extend(nodes)
    index = next(i for i, v in enumerate(graph.outputs) if v is value)
    y.name = name
    y.type = value.type
    graph.outputs[index] = y


# ----------------------------------------------------------------------------- metadata


class RecordFragmentsMetadata(ir.passes.InPlacePass):
    """The usual metadata, with strategy "fragments" and what its off-grid phases equal."""

    def __init__(self, source: str | None = None) -> None:
        super().__init__()
        self.source = source

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnx_dense.passes.finalise import describe

        info = describe(model, STRATEGY, self.source)
        p: PhasePlan = model.meta[PHASES]
        outputs = {}
        for name, out in info.outputs.items():
            off_grid = "global" if name in p.global_outputs else "interior"
            dense_size = tuple(s * e for s, e in zip(out.size, out.est))
            outputs[name] = dataclasses.replace(out, off_grid=off_grid, dense_size=dense_size)
        info = dataclasses.replace(info, outputs=outputs, batches=_batches(p))
        model.metadata_props[metadata.KEY] = info.to_json()
        return ir.passes.PassResult(model, True)


def _sources(moves: list[tuple[ir.Value, list[ir.Value], bool]]) -> dict:
    """The maps a level's moves read, with their spatial axes, dense stride and receptive field:
    a run can compute them on tiles and stitch them before the moves, and where the tensor of
    phases is every f-th position of the map (``every``: _split_after's moves, spatial axes
    last), make it from the map in numpy (runtime/fragment_batches.py). A map
    whose grid is not one window per position is left out (no tiled trunk then)."""
    from onnx_dense.grid import GRID

    found = {}
    for value, made, every in moves:
        g = value.meta.get(GRID)
        if (value.name and g is not None and g.axes is not None and not g.flattened and not g.global_from
                and g.info is None and not g.inserted):
            found[value.name] = {"axes": list(g.axes), "stride": list(g.dense_stride), "rf_start": list(g.rf_start),
                                 "rf_size": list(g.rf_size), "cuts": [v.name for v in made], "every": every}
    return found


def _batches(p: PhasePlan) -> dict:
    """What a run needs to take the batch of phases one phase of a level at a time: per depth
    (levels before it), while every split there removes the same level and no upsampling drops
    it, that level's factor and the tensors its moves make."""
    if not p.cuts:
        return {"refused": "the rewrite removed no stride, so its one phase is the whole model"}
    limit, why = p.depth_limit if p.depth_limit is not None else (max(p.cuts) + 1, "")
    levels = []
    for k in range(limit):
        found = p.levels_at.get(k, {})
        if len(found) != 1 or k not in p.cuts:
            removes = ", ".join(f"node {label} {'removes ' if i == 0 else ''}{'x'.join(map(str, level.factor))}"
                                for i, (level, label) in enumerate(found.items()))
            why = f"its branches remove different strides at level {k + 1}" + (f": {removes}" if removes else "")
            break
        (level,) = found
        levels.append({"factor": list(level.factor), "cuts": [v.name for v in p.cuts[k]],
                       "sources": _sources(p.sources.get(k, []))})
    if not levels:
        return {"refused": why}
    for name, spec in p.interleaved.items():
        for have, want in zip(spec["levels"], levels):
            if have != want["factor"]:
                return {"refused": f"output '{name}' carries other levels than the splits"}
    return {"levels": levels, "outputs": dict(p.interleaved)}
