"""Phase by phase: a dense model run as the original network on each phase of its maps.

Why it is exact. Where the rewrite removed a stride s, the dense map ``M`` that follows is
read by every later window with dilation ``d*e`` and pads ``p*e``, ``e`` a multiple of
``s``. Such a window never mixes positions of different phases: output position
``ph + s*t`` reads only ``M[ph + s*u]``, and its zero (or lowest-value) border falls exactly
where ``M[ph::s]`` ends. So phase ``ph`` of everything downstream is the same graph with
dilations and pads divided by ``s``, applied to ``M[..., ph::s]``: the original's strided
layers again, on a map ``s`` times smaller per axis. Joins crop to the shortest operand from
``Shape`` at run time, which per phase crops to the same positions.

The plan. The rewrite records the eST of every dense value (``DenseInfo.values``). Each
node's level is the eST of its input; the levels form a chain ``1 = E0 | E1 | E2 ...`` (the
products of removed strides). Stage ``k`` holds the nodes of level ``Ek``, with dilations,
pads (of windows and Pad nodes) and Slice bounds divided by ``Ek``; it becomes its own small
ONNX model and onnxruntime session. A run feeds stage 0 the image, then, for each of the
``(E1/E0)^n`` phases, stage 1 the phase's slice of the values it needs, and so on down the
chain; results are put back at ``[ph::s]``. Every multiply-add of the dense model is done
once (no tile overlap), and at a time only one phase's activations of a stage are alive:
about the original network's memory at that stage, plus the values held across a split.

The tiled trunk. Stage 0 (the trunk) runs on the whole image at the original strides, so
its first maps are the largest of the run and no split makes them smaller. It is a model of
its own, local like the whole (:func:`~onnx_dense.runtime.tiling.check_tileable` on its
nodes), whose outputs' strides and receptive fields the rewrite records
(``DenseInfo.fields``): it tiles exactly by :mod:`onnx_dense.runtime.tiling` with tiles that
overlap by its own receptive field (115 px for a ResNet-18 at output stride 8, against 627
for the model), and later stages run phase by phase on the stitched maps (``run(trunk=...)``).

Stage sessions run without onnxruntime's memory arena: an arena keeps what a session once
needed, so stages would add their peaks up instead of taking the largest. The runs of one
stage in a loop of phases (and the trunk's tiles) share their input copies and output arrays
(:mod:`onnx_dense.runtime.buffers`), so only the first run's pages are fresh.

An elementwise node (``POINTWISE``) whose inputs an earlier stage makes runs in that stage, on
the whole map, not at its own level: the activation after a stride-removed conv then fuses
into it, and one value crosses the boundary, where the conv's output was reordered out of
onnxruntime's blocked layout and back in for a lone Relu.

Strategy ``fragments`` keeps its phases on the batch axis; :mod:`onnx_dense.runtime.fragment_batches`
splits that batch instead, level by level, with a plan of the same shape.

What cannot be split (per-phase global context, a model written before
the values were recorded, a pad or slice that is not a multiple of its level, strided
windows in the dense region) raises :class:`DenseError` when the plan is built; the session
then falls back to whole-image or tiled runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_dense import metadata
from onnx_dense.errors import DenseError, node_label
from onnx_dense.runtime.buffers import Buffers
from onnx_dense.runtime.schedule import ELEMENTWISE
from onnx_dense.runtime.tiling import Geometry, OutputAxes


class StageRefused(DenseError):
    """onnxruntime refused a stage on a phase or a tile of an image the whole model runs: a
    phase of a small image can be shorter than a window, and the branches of a join can
    differ in size at a tile's size where they agree at the image's. The session then runs
    the image whole where that fits."""


WINDOW_OPS = {"Conv", "MaxPool", "AveragePool", "LpPool", "ConvTranspose", "ConvInteger", "QLinearConv"}
# Position by position: a phase of the output is the op on that phase of its inputs, so the
# node may run in the stage that makes its inputs (_assign). Benchmarks/README.md, "A stage's
# runs share their buffers": the ResNet at 8000, Relu 0.37 -> 0.20 s, model runs 11.65 -> 11.21 s.
# The estimate's list (what runs in place or fuses), so that both see the same stages.
POINTWISE = ELEMENTWISE
_BIG_INT = 2**62  # Slice ends at or above this mean "to the end"


@dataclasses.dataclass
class Stage:
    """The nodes of one level, as a model of their own."""

    index: int
    level: tuple[int, ...]  # eST of the stage's inputs, per spatial axis
    split: tuple[int, ...]  # level / previous level: phases per axis entered from the stage before
    nodes: list[onnx.NodeProto]  # the dense model's nodes (unchanged), in graph order
    inputs: list[str]
    outputs: list[str]  # values later stages read, and graph outputs made here
    model: bytes | None = None  # serialised stage model, dropped once a session holds it
    # run(feeds) -> outputs; run(feeds, buffers): feeds may be views, outputs written into the
    # runs' shared buffers (runtime/buffers.py), valid until the next run with those buffers
    run: Callable[..., dict[str, np.ndarray]] | None = None
    divide: bool = True  # dilations, pads and slices divided by the level (False: fragments' batches)


@dataclasses.dataclass
class PhasePlan:
    stages: list[Stage]
    input_name: str
    value_axes: dict[str, tuple[int, ...]]  # spatial axes of values passed between stages and of outputs
    output_names: list[str]
    _types: dict = dataclasses.field(default_factory=dict, repr=False)
    _constants: dict = dataclasses.field(default_factory=dict, repr=False)
    _axes: dict = dataclasses.field(default_factory=dict, repr=False)
    sessions: list = dataclasses.field(default_factory=list, repr=False)  # set by DenseSession

    @property
    def depth(self) -> int:
        return len(self.stages) - 1

    def estimate_stages(self):
        """(level, (inputs, outputs, op_type) per node, stage inputs, stage outputs, how) per stage,
        for schedule.phases_peak: every stage after the trunk runs in a loop of phases that share
        their output buffers (``bound``: :meth:`_run_from`)."""
        return [
            (s.level, [([i for i in n.input if i], [o for o in n.output if o], n.op_type) for n in s.nodes],
             s.inputs, s.outputs, {"bound": k > 0})
            for k, s in enumerate(self.stages)
        ]

    @property
    def splits(self) -> int:
        """Number of runs of the last stage: the product of every level's phases."""
        return int(np.prod(self.stages[-1].level)) if self.stages else 1

    def describe(self) -> str:
        levels = " -> ".join("x".join(map(str, s.level)) for s in self.stages)
        return f"{len(self.stages)} stages at eST {levels}"

    # -- running --------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, np.ndarray], trunk: Callable | None = None) -> dict[str, np.ndarray]:
        """All graph outputs for ``feeds`` (the dense model's inputs, numpy). ``trunk``, if
        given, runs stage 0 instead of its session (the tiled trunk: :func:`trunk_axes`)."""
        env = dict(feeds)
        interleaved = _Interleaved(self.value_axes)
        result = self._run_from(0, env, trunk, interleaved, (), None)
        result.update(interleaved.result())
        return {name: result[name] for name in self.output_names}

    def trunk_axes(self, info: metadata.DenseInfo) -> list:
        """Stage 0's outputs as tiles stitch them (:class:`~onnx_dense.runtime.tiling.OutputAxes`):
        the trunk, before the first split, is the original network, so it tiles like a model
        whose outputs are the maps it hands on, with their own small receptive fields."""
        fields = info.fields
        if fields is None:
            raise DenseError("this dense model was written before onnx-dense recorded its values' receptive fields; "
                             "rewrite it again to tile its trunk")
        result = []
        for name in self.stages[0].outputs:
            out = info.outputs.get(name)
            if out is not None and out.input == self.input_name and out.upsampling is None:
                geometry = zip(out.stride, out.rf_start, out.rf_size)
                axes = tuple(out.spatial_axes)
            elif name in fields and name in self.value_axes:
                geometry = zip(*fields[name])
                axes = tuple(self.value_axes[name])
            else:
                raise DenseError(f"the trunk hands on '{name}', whose positions do not each see one window of the "
                                 "image, so its tiles could not be stitched")
            result.append(OutputAxes(name, axes, tuple(Geometry(*g) for g in geometry)))
        return result

    def _needed_after(self, k: int) -> set[str]:
        return {n for s in self.stages[k + 1:] for n in s.inputs}

    def _run_from(self, k: int, env: dict[str, np.ndarray], trunk: Callable | None, interleaved: "_Interleaved",
                  path: tuple, reused: Buffers | None) -> dict[str, np.ndarray]:
        """Stage ``k`` on the phase ``path`` ((split, phase) per level above), then each phase of
        the stages below; returns stage 0's outputs, the later ones go into ``interleaved``.
        ``reused``: the buffers of stage ``k``'s runs in this loop of phases (none for stage 0,
        which runs once and whose outputs are the caller's)."""
        stage = self.stages[k]
        later = self._needed_after(k)
        feeds = {n: env[n] for n in stage.inputs}
        for n in stage.inputs:  # nothing of this level is needed once the stage has run
            if n not in later:
                env.pop(n, None)
        if k == 0 and trunk is not None:
            made = trunk(feeds)
        elif reused is None:
            made = stage.run(feeds)
        else:
            made = stage.run(feeds, reused)
            if k + 1 < len(self.stages):  # the copies of its inputs are not held while the stages below run
                reused.drop("in")
        del feeds
        results = {}
        for n in [n for n in made if n in self.output_names]:  # an output may be a later stage's input too
            if k == 0:
                results[n] = made[n]
            else:
                interleaved.place(n, made[n], path)
        if k + 1 == len(self.stages):
            return results
        carry = {n: v for n, v in {**env, **made}.items() if n in later}
        del made
        env.clear()
        split = self.stages[k + 1].split
        below = Buffers()
        for phase in itertools.product(*(range(f) for f in split)):
            sub = {n: _phase_view(v, self.value_axes[n], split, phase) if n in self.value_axes else v
                   for n, v in carry.items()}
            self._run_from(k + 1, sub, None, interleaved, path + ((split, phase),), below)
            del sub
        below.clear()
        return results


class _Interleaved:
    """The outputs of later stages, each phase's run written straight to its positions in one
    array per output. Phase ``ph`` of a split ``f`` holds positions ``ph::f`` of the level above,
    so a run's positions are the views of the levels' phases nested: no array per level (those
    held 1/4 + 1/16 + ... of the output more, and a copy per level)."""

    def __init__(self, value_axes: Mapping[str, tuple[int, ...]]):
        self.value_axes = value_axes
        self.buffers: dict[str, np.ndarray] = {}
        self.lengths: dict[str, list[dict]] = {}  # per output and axis: the length of each run's positions

    def place(self, name: str, value: np.ndarray, path: tuple) -> None:
        axes = self.value_axes[name]
        if name not in self.buffers:  # the first run, phase 0 at every level, is the longest
            shape = list(value.shape)
            for split, _ in path:
                for a, f in zip(axes, split):
                    shape[a] *= f
            self.buffers[name] = np.empty(shape, dtype=value.dtype)
            self.lengths[name] = [{} for _ in axes]
        view = self.buffers[name]
        for split, phase in path:
            view = _phase_view(view, axes, split, phase)
        view[_first(value.shape, axes)] = value
        for i, a in enumerate(axes):
            self.lengths[name][i][tuple(phase[i] for _, phase in path)] = value.shape[a]

    def result(self) -> dict[str, np.ndarray]:
        results = {}
        for name, buf in self.buffers.items():
            crop = [slice(None)] * buf.ndim
            for i, a in enumerate(self.value_axes[name]):
                crop[a] = slice(0, sum(self.lengths[name][i].values()))
            results[name] = buf[tuple(crop)]
        return results


def _phase_view(array: np.ndarray, axes: Sequence[int], split: Sequence[int], phase: Sequence[int]) -> np.ndarray:
    index = [slice(None)] * array.ndim
    for a, f, p in zip(axes, split, phase):
        index[a] = slice(p, None, f)
    return array[tuple(index)]


def _first(shape: Sequence[int], axes: Sequence[int]) -> tuple:
    """Index of the first ``shape[a]`` positions along ``axes`` (a phase's share of a buffer slice)."""
    index = [slice(None)] * len(shape)
    for a in axes:
        index[a] = slice(0, shape[a])
    return tuple(index)


# --------------------------------------------------------------------------------------------
# building the plan
# --------------------------------------------------------------------------------------------


def levels_of(info: metadata.DenseInfo, input_name: str) -> list[tuple[int, ...]]:
    """The eST levels of the dense region (1 first), from the metadata alone."""
    n = len(info.inputs[input_name].spatial_axes)
    found = {tuple(e) for e, _ in (info.values or {}).values()} | {(1,) * n}
    return sorted(found, key=lambda e: (math.prod(e), e))


def plan(proto: onnx.ModelProto, info: metadata.DenseInfo, input_name: str, depth: int | None = None) -> PhasePlan:
    """:func:`layout` and :func:`build`: stages with their models (``proto`` with its weights)."""
    return build(layout(proto, info, input_name, depth), proto)


def build(phase_plan: PhasePlan, proto: onnx.ModelProto) -> PhasePlan:
    """Give every stage its serialised model, weights taken from ``proto``."""
    for stage in phase_plan.stages:
        stage.model = _stage_model(proto, stage, phase_plan._constants, phase_plan._axes, phase_plan._types).SerializeToString()
    return phase_plan


def check_stages(phase_plan: PhasePlan, proto: onnx.ModelProto) -> None:
    """Raise the DenseError :func:`build` would (a dilation, pad or stride its level does not
    divide), without keeping the stage models: ``proto`` may lack the weights' data."""
    for stage in phase_plan.stages:
        _stage_model(proto, stage, phase_plan._constants, phase_plan._axes, phase_plan._types)


def layout(proto: onnx.ModelProto, info: metadata.DenseInfo, input_name: str, depth: int | None = None) -> PhasePlan:
    """Split the graph of ``proto`` (weights not needed) into stages; DenseError if it cannot be.

    ``depth``: split at the first ``depth`` eST levels only (None: at all of them); the levels
    below the last split run inside its stage as the dense model does, with dilations divided
    by the stage's level. Fewer splits: fewer, larger runs (faster on small maps), more memory.
    """
    if info.strategy == "fragments":  # the batch of phases, one phase of a level at a time
        from onnx_dense.runtime import fragment_batches

        return fragment_batches.layout(proto, info, input_name, depth)
    if info.strategy != "dilate":
        raise DenseError(f"strategy '{info.strategy}' models run their phases in one graph already; run whole")
    if info.per_phase_global:
        raise DenseError("this model computes global context per phase; run whole")
    if info.values is None:
        raise DenseError(
            "this dense model was written before onnx-dense recorded the eST of its values; rewrite it again to run it "
            "phase by phase"
        )
    entry = info.inputs.get(input_name)
    if entry is None:
        raise DenseError(f"input '{input_name}' has no spatial axes in the model's metadata")
    n = len(entry.spatial_axes)
    graph = proto.graph
    init_names = {t.name for t in graph.initializer}
    one = (1,) * n
    est: dict[str, tuple[int, ...] | None] = {i.name: one for i in graph.input if i.name not in init_names}
    axes: dict[str, tuple[int, ...]] = {input_name: tuple(entry.spatial_axes)}
    node_level: list[tuple[int, ...] | None] = []
    for node in graph.node:
        levels = [est[i] for i in node.input if i and est.get(i) is not None]
        level = None
        if levels:
            level = tuple(max(e[k] for e in levels) for k in range(n))
            if any(any(level[k] % e[k] for k in range(n)) for e in levels):
                raise DenseError(f"node {node_label(node)} joins values of eST {sorted(set(levels))}; cannot split into phases")
        node_level.append(level)
        src_axes = next((axes[i] for i in node.input if i in axes), None)
        for out in node.output:
            if not out:
                continue
            recorded = info.values.get(out)
            if recorded is not None:
                est[out] = tuple(recorded[0])
                axes[out] = tuple(recorded[1])
            else:
                est[out] = level
                if src_axes is not None and level is not None:
                    axes[out] = src_axes
    for name, out in info.outputs.items():
        axes[name] = tuple(out.spatial_axes)
    levels = sorted({lv for lv in node_level if lv is not None}, key=lambda e: (math.prod(e), e))
    if not levels or levels[0] != one:
        levels = [one] + [lv for lv in levels if lv != one]
    for a, b in zip(levels, levels[1:]):
        if any(y % x for x, y in zip(a, b)):
            raise DenseError(f"eST levels {a} and {b} do not divide each other; cannot split into phases")
    if depth is not None:
        levels = levels[: max(0, int(depth)) + 1]
    index_of = {}
    for lv in {lv for lv in node_level if lv is not None}:
        # the deepest kept level that divides this node's level
        index_of[lv] = max(i for i, kept in enumerate(levels) if all(x % y == 0 for x, y in zip(lv, kept)))
    # Nodes with no image-derived input (Constant, arithmetic on constants) go with every stage that reads them.
    constant_nodes = {o: node for node, lv in zip(graph.node, node_level) if lv is None for o in node.output if o}
    stage_nodes, producer = _assign(graph.node, node_level, index_of, len(levels), info.fields or {})
    outputs = [o.name for o in graph.output]
    for o in outputs:
        if o not in producer:
            raise DenseError(f"output '{o}' is not computed from the image; cannot split into phases")
        if o not in info.outputs:
            raise DenseError(f"output '{o}' has no spatial axes in the metadata; cannot split into phases")
    stages: list[Stage] = []
    reads: list[set[str]] = []
    for k, nodes in enumerate(stage_nodes):
        made = {o for node in nodes for o in node.output if o}
        need = []
        for node in nodes:
            for i in node.input:
                if i and i not in made and i not in init_names and i not in constant_nodes and i not in need:
                    need.append(i)
        reads.append(set(need))
        for i in need:
            if producer.get(i, 0) > k:
                raise DenseError(f"value '{i}' is read before it is made; cannot split into phases")
        prev = levels[k - 1] if k else one
        split = tuple(b // a for a, b in zip(prev, levels[k]))
        stages.append(Stage(k, levels[k], split, nodes, need, []))
    for k, stage in enumerate(stages):
        later = set().union(*reads[k + 1:]) if k + 1 < len(reads) else set()
        stage.outputs = [o for node in stage.nodes for o in node.output if o and (o in later or o in outputs)]
        for name in stage.outputs:
            if name in later and name not in axes:
                raise DenseError(f"value '{name}' passes between phases but its spatial axes are unknown")
        for name in stage.inputs:
            if name not in axes and producer.get(name) is not None:
                raise DenseError(f"value '{name}' passes between phases but its spatial axes are unknown")
    value_axes = {k: v for k, v in axes.items() if any(k in s.inputs or k in s.outputs for s in stages)}
    result = PhasePlan(stages, input_name, value_axes, outputs)
    result._types = _value_types(proto, info, input_name)
    result._constants, result._axes = constant_nodes, axes
    return result


def _assign(nodes, node_level, index_of, count: int, fields) -> tuple[list[list[onnx.NodeProto]], dict[str, int]]:
    """Each node's stage: its level's, or, for an elementwise node (POINTWISE) whose inputs are
    all made earlier, the stage that makes them (into the trunk only where its tiles can stitch
    the result: a field recorded). A stage left empty by that keeps its nodes (it would be a
    model with nothing to run, or its split lost)."""
    keep: set[int] = set()
    while True:
        stage_nodes: list[list[onnx.NodeProto]] = [[] for _ in range(count)]
        producer: dict[str, int] = {}
        for node, lv in zip(nodes, node_level):
            if lv is None:
                continue
            k = index_of[lv]
            made_in = [producer[i] for i in node.input if i in producer]
            if (node.op_type in POINTWISE and k not in keep and made_in and max(made_in) < k
                    and (max(made_in) or all(o in fields for o in node.output if o))):
                k = max(made_in)
            stage_nodes[k].append(node)
            for o in node.output:
                if o:
                    producer[o] = k
        empty = {k for k in set(index_of.values()) if not stage_nodes[k]} - keep
        if not empty:
            return stage_nodes, producer
        keep |= empty


def _value_types(proto: onnx.ModelProto, info: metadata.DenseInfo, input_name: str) -> dict[str, tuple[int, list]]:
    """(element type, dims) of every value, from shape inference on the graph without its weights.

    Dims are those at the rewrite's static size, with the spatial ones made symbolic by the
    caller: onnxruntime's layout optimisations (NCHWc) need the rank and channel counts.
    """
    from onnx_dense.runtime.tiling import _light_copy, infer_static

    entry = info.inputs[input_name]
    found: dict[str, tuple[int, list]] = {}
    for t in proto.graph.initializer:
        found[t.name] = (t.data_type, list(t.dims))
    try:
        light = _light_copy(proto, input_name, dict(zip(entry.spatial_axes, entry.size)))
        inferred = infer_static(light)
        for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            tt = vi.type.tensor_type
            if not tt.elem_type:
                continue
            dims = None
            if tt.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            found.setdefault(vi.name, (tt.elem_type, dims))
    except Exception:
        pass
    return found


def _stage_model(proto: onnx.ModelProto, stage: Stage, constant_nodes, axes, types) -> onnx.ModelProto:
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    extra_inits: list[onnx.TensorProto] = []
    used: set[str] = set()
    wanted_consts: list[str] = []
    for node in stage.nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if stage.divide:
            _divide(copy, stage.level, axes, inits, constant_nodes, extra_inits)
        nodes.append(copy)
        for i in copy.input:
            if i in inits:
                used.add(i)
            elif i in constant_nodes and i not in wanted_consts:
                wanted_consts.append(i)
    # constant subgraphs the stage reads (in graph order, with their own constant inputs)
    const_nodes: list[onnx.NodeProto] = []
    seen: set[int] = set()

    def add_const(name: str) -> None:
        node = constant_nodes[name]
        if id(node) in seen:
            return
        for i in node.input:
            if i in constant_nodes:
                add_const(i)
            elif i in inits:
                used.add(i)
        seen.add(id(node))
        const_nodes.append(node)

    for name in wanted_consts:
        add_const(name)
    order = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    const_nodes.sort(key=lambda n: order.get(n.output[0], -1))

    def vi(name: str) -> onnx.ValueInfoProto:
        elem, dims = types.get(name, (onnx.TensorProto.FLOAT, None))
        spatial = axes.get(name)
        if dims is not None and spatial is not None and max(spatial) < len(dims):
            dims = [f"{_safe(name)}_{k}" if k in spatial or d is None else d for k, d in enumerate(dims)]
        else:
            dims = None
        return helper.make_tensor_value_info(name, elem, dims)

    g = helper.make_graph(
        const_nodes + nodes, f"{graph.name or 'dense'}_stage{stage.index}",
        [vi(i) for i in stage.inputs], [vi(o) for o in stage.outputs],
        [inits[i] for i in sorted(used)] + extra_inits,
    )
    model = helper.make_model(g, opset_imports=list(proto.opset_import))
    model.ir_version = proto.ir_version
    return model


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)[-40:]


def _const(name: str, inits, constant_nodes) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = constant_nodes.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_ints", "value_int"):
                return np.array(helper.get_attribute_value(a), dtype=np.int64)
    return None


def _divide(node: onnx.NodeProto, level, axes, inits, constant_nodes, extra_inits) -> None:
    """Dilations, pads and slice bounds of ``node`` divided by ``level`` (in place on the copy)."""
    if all(e == 1 for e in level):
        return
    n = len(level)

    def refuse(why: str) -> DenseError:
        return DenseError(f"node {node_label(node)}: {why}; cannot split into phases of eST {'x'.join(map(str, level))}")

    def divided(value: int, e: int, what: str) -> int:
        if value % e:
            raise refuse(f"{what} {value} is not a multiple of {e}")
        return value // e

    def new_const(array: np.ndarray, i: int) -> None:
        name = f"{node.input[i]}_phase{'x'.join(map(str, level))}_{node.name or node.op_type}"
        extra_inits.append(numpy_helper.from_array(array, name))
        node.input[i] = name

    if node.domain not in ("", "ai.onnx"):
        raise refuse(f"op domain '{node.domain}'")
    attrs = {a.name: a for a in node.attribute}
    if node.op_type in WINDOW_OPS:
        auto_pad = helper.get_attribute_value(attrs["auto_pad"]).decode() if "auto_pad" in attrs else "NOTSET"
        if auto_pad not in ("NOTSET", "VALID"):
            raise refuse(f"auto_pad={auto_pad}")
        kernel = list(helper.get_attribute_value(attrs["kernel_shape"])) if "kernel_shape" in attrs else None
        if kernel is None and len(node.input) > 1 and node.input[1] in inits:
            kernel = list(inits[node.input[1]].dims[2:])
        rank = next((len(helper.get_attribute_value(attrs[a])) for a in ("strides", "dilations")
                     if a in attrs), len(kernel) if kernel is not None else n)
        # the level of each window axis: the input's axis 2 + j, spatial or not (a torch
        # LocalResponseNorm windows the channels of a 5-D view: only its last two axes are spatial)
        x_axes = axes.get(node.input[0])
        if x_axes is not None:
            levels = [level[list(x_axes).index(2 + j)] if 2 + j in x_axes else 1 for j in range(rank)]
        elif rank == n:
            levels = list(level)
        else:
            raise refuse("spatial axes of its input unknown")
        strides = list(helper.get_attribute_value(attrs["strides"])) if "strides" in attrs else [1] * rank
        if any(s != 1 for s in strides):
            raise refuse(f"strides {strides} in the dense region")
        dil = list(helper.get_attribute_value(attrs["dilations"])) if "dilations" in attrs else [1] * rank
        if kernel is None and any(d != 1 for d in dil):
            raise refuse("kernel size unknown")
        new_dil = []
        for k, (d, e) in enumerate(zip(dil, levels)):
            new_dil.append(1 if kernel is not None and kernel[k] == 1 else divided(d, e, "dilation"))
        pads = list(helper.get_attribute_value(attrs["pads"])) if "pads" in attrs else [0] * (2 * rank)
        new_pads = [divided(p, levels[k % rank], "pad") for k, p in enumerate(pads)]
        for name, values in (("dilations", new_dil), ("pads", new_pads)):
            if name in attrs:
                node.attribute.remove(attrs[name])
            if name in attrs or any(v != (1 if name == "dilations" else 0) for v in values):
                node.attribute.append(helper.make_attribute(name, values))  # (no dilations before AveragePool-19)
        return
    if node.op_type == "Pad":
        x_axes = axes.get(node.input[0])
        if "pads" in attrs:  # opset < 11
            pads = list(helper.get_attribute_value(attrs["pads"]))
            source = None
        else:
            pads = _const(node.input[1], inits, constant_nodes) if len(node.input) > 1 else None
            if pads is None:
                raise refuse("pads computed at run time")
            pads = [int(p) for p in pads.reshape(-1)]
            source = 1
        if len(node.input) > 3 and node.input[3]:
            raise refuse("Pad with axes")
        rank = len(pads) // 2
        if x_axes is None:
            if any(pads):
                raise refuse("spatial axes of its input unknown")
            return
        new = list(pads)
        for k, a in enumerate(x_axes):
            new[a] = divided(pads[a], level[k], "pad")
            new[a + rank] = divided(pads[a + rank], level[k], "pad")
        if source is None:
            node.attribute.remove(attrs["pads"])
            node.attribute.append(helper.make_attribute("pads", new))
        elif new != pads:
            new_const(np.array(new, dtype=np.int64), 1)
        return
    if node.op_type == "Slice":
        x_axes = axes.get(node.input[0])
        if "starts" in attrs:
            raise refuse("Slice-1 (attributes)")
        starts = _const(node.input[1], inits, constant_nodes)
        ends = _const(node.input[2], inits, constant_nodes)
        slice_axes = _const(node.input[3], inits, constant_nodes) if len(node.input) > 3 and node.input[3] else None
        steps = _const(node.input[4], inits, constant_nodes) if len(node.input) > 4 and node.input[4] else None
        if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and slice_axes is None):
            # bounds from Shape at run time (a join's crop): per phase they crop to the same positions
            return
        starts, ends = starts.reshape(-1).astype(np.int64), ends.reshape(-1).astype(np.int64)
        slice_axes = slice_axes.reshape(-1) if slice_axes is not None else np.arange(len(starts))
        if x_axes is None:
            return
        new_s, new_e = starts.copy(), ends.copy()
        for i, a in enumerate(slice_axes):
            a = int(a)
            if a < 0:
                raise refuse("negative slice axes")
            if a not in x_axes:
                continue
            e = level[list(x_axes).index(a)]
            if steps is not None and int(steps.reshape(-1)[i]) != 1:
                raise refuse("a strided slice")
            new_s[i] = divided(int(starts[i]), e, "slice start")
            if abs(int(ends[i])) < _BIG_INT:
                new_e[i] = divided(int(ends[i]), e, "slice end")
        if not np.array_equal(new_s, starts):
            new_const(new_s, 1)
        if not np.array_equal(new_e, ends):
            new_const(new_e, 2)
        return
    if node.op_type in ("Resize", "Upsample", "DepthToSpace", "SpaceToDepth", "GlobalAveragePool", "GlobalMaxPool",
                        "InstanceNormalization", "GroupNormalization"):
        raise refuse(f"{node.op_type} in the dense region")
