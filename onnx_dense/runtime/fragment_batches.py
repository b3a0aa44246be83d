"""Phase by phase for ``fragments`` models: the batch of phases, one phase of a level at a time.

A ``fragments`` model moves the phases of every removed stride to the batch axis and runs the
original ops on that batch (passes/fragments.py). The moves of the first level put its phase
``a`` at batch entries ``a*N .. a*N + N``; those of a deeper level put its phase ``a`` in front
of the batch they get (``a*B + b``); every other op acts on each batch entry alone (the rewrite
refuses ops that mix the batch), and an upsampling keeps the first block of the levels it
drops. So what follows a level's moves can run on one of its phases at a time, on that
phase's entries of the moved tensors (a contiguous slice: no copy), and does exactly what the
whole run does on them: ``1/f`` of the dense model's memory there per level split, and no
multiply-add done twice.

The plan is a :class:`~onnx_dense.runtime.phases.PhasePlan` (the session, the schedule's
estimate and ``run`` treat it the same), split ``depth`` levels deep:

* stage 0, the nodes that do not depend on a tensor of phases (the trunk at the original
  strides, up to the maps the first level's moves read), on the whole image;
* stage k, the nodes that depend on level k's moves but not on level k+1's (or, for the last
  stage, on any deeper ones), once per phase of levels 1..k; the outputs' batch-to-space is
  left out.

Where the rewrite's moves take every f-th position of a map (passes/fragments.py,
``_split_after``; the rewrite records each level's maps, with their fields, as ``sources``), a
stage hands on the map and the moves are done here in numpy (:func:`_moved`): one copy, an
array per phase, after which the map is dropped, where the graph's moves (a crop, then a copy
per transposed axis) held up to three copies of the map beside the stage's own values. Each
phase's array goes once the phase has run, before the levels below it run, so the deepest
stage of the first phase holds (f-1)/f of each level's map above it. (Copying each phase's
positions from the map as it runs instead, 1/f of it, measured worse: the whole map stays,
and that copy is alive with the next stage's values, at the run's peak.) Moves that shift
copies of a padded input (``_split``) run as they are: level 1's as a stage of their own
between the trunk and level 1, deeper levels' inside their stage.

The tiled trunk. Stage 0 ends at the maps level 1's moves read, so it is the original network
at the kept strides: it tiles as a dilated trunk does (``run(trunk=...)``), and the maps
are stitched before the moves. Only the trunk: the positions of a level's phases run on a
zero extension that depends on the map's length (passes/fragments.py), so a tile of what
follows is not a crop of the whole run.

Each output's batch-to-space is done here in numpy, straight into the output buffer, one run
at a time (:func:`_place`): the graph's own (Reshape, Transpose, Reshape) would need the whole
batch of phases, then a second copy. The rewrite records the levels, the tensors each level's
moves make and what each output interleaves (``DenseInfo.batches``); where a level's phases
cannot run apart (an upsampling that drops it, branches that remove different strides at that
depth) it records only the levels above, or why there are none, and the model runs whole.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from onnx_dense import metadata
from onnx_dense.errors import DenseError, node_label
from onnx_dense.runtime.phases import PhasePlan, Stage, _first, _phase_view, _value_types
from onnx_dense.runtime.tiling import Geometry, OutputAxes


@dataclasses.dataclass
class BatchPlan(PhasePlan):
    """Stages of a ``fragments`` model: the trunk whole, each deeper stage once per phase."""

    factors: tuple[tuple[int, ...], ...] = ()  # per split level, its phases per axis
    cuts: tuple[tuple[str, ...], ...] = ()  # per split level, the tensors its moves make
    interleaved: dict = dataclasses.field(default_factory=dict)  # output -> DenseInfo.batches spec
    made_at: dict = dataclasses.field(default_factory=dict)  # output -> the level that makes it
    # Per split level, the maps its moves read (DenseInfo.batches), by name: axes, field, cuts.
    # ``moves``: True where level 1's moves are apart from the trunk before them, which then
    # tiles (``run(trunk=...)``); else why not (stage 0 ends in the moves).
    sources: tuple[dict, ...] = ()
    moves: str | bool = False
    # Levels (0: the first) whose moves are done in numpy (:func:`_moved`), each tensor of
    # phases being every f-th position of its map (``every``). Where level 1 is not among them
    # but its moves are apart, they are stage 1, run on the whole maps.
    in_numpy: frozenset = frozenset()

    @property
    def depth(self) -> int:
        return len(self.factors)

    def estimate_stages(self):
        """As :meth:`PhasePlan.estimate_stages`, with how each stage runs (schedule.phases_peak):
        a level's stage reads slices of its tensors of phases (no copies), the stage before
        it hands on the maps its moves, done in numpy, read, and each phase's array of those
        goes once the phase has run."""
        plain = super().estimate_stages()
        level_at = {self._first_level + k: k + 1 for k in range(self.depth)}  # stage -> its level
        result = []
        for i, stage in enumerate(plain):
            level = level_at.get(i, 0)  # the trunk (and level 1's moves) at 0
            moved = {}
            if level in self.in_numpy:  # level 0 is then stage 0 alone (its moves are no stage)
                moved = {name: spec["cuts"][0] for name, spec in self.sources[level].items()}
            freed = [spec["cuts"][0] for spec in self.sources[level - 1].values()] if level - 1 in self.in_numpy else []
            result.append((*stage[:4], {"views": i >= self._first_level, "moved": moved, "freed": freed}))
        return result

    @property
    def _first_level(self) -> int:
        """Index of the stage of level 1 (after the trunk, and its moves where they are apart)."""
        return 2 if self.moves is True and 0 not in self.in_numpy else 1

    def describe(self) -> str:
        deep = f"{self.depth} level{'s' if self.depth != 1 else ''}"
        return f"{self.depth + 1} stages: the trunk, then the batch of phases split {deep} deep"

    def trunk_axes(self, info: metadata.DenseInfo) -> list:
        """Stage 0's outputs as tiles stitch them: the maps the first moves read (the trunk
        before them is the original network at the kept strides, so it tiles like a dense
        model), and any graph output it makes."""
        if self.moves is not True:
            raise self._untiled()
        result = []
        for name in self.stages[0].outputs:
            out = info.outputs.get(name)
            if name in self.sources[0]:
                spec = self.sources[0][name]
                geometry = zip(spec["stride"], spec["rf_start"], spec["rf_size"])
                axes = tuple(spec["axes"])
            elif out is not None and out.input == self.input_name and out.upsampling is None:
                geometry = zip(out.stride, out.rf_start, out.rf_size)
                axes = tuple(out.spatial_axes)
            else:
                raise DenseError(f"the trunk hands on '{name}', whose positions do not each see one window of the "
                                 "image, so its tiles could not be stitched")
            result.append(OutputAxes(name, axes, tuple(Geometry(*g) for g in geometry)))
        return result

    def _moved_here(self, k: int, made: dict) -> dict:
        """Level ``k + 1``'s tensors of phases, from the maps in ``made`` that its moves read
        (popped: each map is gone once its tensor of phases is made)."""
        return {spec["cuts"][0]: _moved(made.pop(name), spec["axes"], self.factors[k])
                for name, spec in self.sources[k].items()}

    def _untiled(self) -> DenseError:
        return DenseError(f"the trunk of this 'fragments' model ends in moves to the batch, which tiles would not "
                          f"stitch: {self.moves}")

    def run(self, feeds: Mapping[str, np.ndarray], trunk: Callable | None = None) -> dict[str, np.ndarray]:
        """All graph outputs for ``feeds``. ``trunk``, if given, runs stage 0 instead of its
        session (the tiled trunk: :meth:`trunk_axes`)."""
        if trunk is not None and self.moves is not True:
            raise self._untiled()
        first = self.stages[0]
        made = (trunk or first.run)({n: np.ascontiguousarray(feeds[n]) for n in first.inputs})
        later = {n for s in self.stages[self._first_level:] for n in s.inputs}
        if self._first_level == 2:  # level 1's moves, on the whole maps
            moves = self.stages[1]
            env = {**feeds, **made}
            moved = moves.run({n: np.ascontiguousarray(env[n]) for n in moves.inputs})
            del env
            made = {n: v for n, v in made.items() if n in later or n in self.output_names}
            made.update(moved)
            del moved
        results = {n: made[n] for n in self.output_names if n in made and n not in self.interleaved}
        shared = {n: (made[n] if n in made else feeds[n]) for n in later if n in made or n in feeds}
        cuts = {n: shared.pop(n) for n in self.cuts[0] if n in shared}
        if 0 in self.in_numpy:
            cuts.update(self._moved_here(0, made))
        del made
        batch = {_batch(v) for v in cuts.values()}
        phases = math.prod(self.factors[0])
        if len(batch) != 1 or next(iter(batch)) % phases:
            raise DenseError(f"the tensors of phases have batch sizes {sorted(batch)}, not one multiple of {phases}")
        buffers: dict[str, np.ndarray] = {}
        self._run_level(1, shared, cuts, (), next(iter(batch)) // phases, buffers)
        results.update(buffers)
        return {name: results[name] for name in self.output_names}

    def _run_level(self, k: int, shared: dict, cuts: dict, prefix: tuple, n: int, buffers: dict) -> None:
        """Stage ``k`` once per phase of level ``k``, on ``cuts`` (this level's tensors of
        phases, for the phase ``prefix`` of the levels above: a batch, or a list of one array
        per phase where the moves were done in numpy), and the stages below it. A phase's
        array in a list is dropped once its phase has run, before the levels below it run."""
        stage = self.stages[k - 1 + self._first_level]
        phases = math.prod(self.factors[k - 1])
        size = _batch(next(iter(cuts.values()))) // phases
        mine = [o for o, at in self.made_at.items() if at == k]
        for a in range(phases):
            feeds = {name: (_phase(cuts[name], a, size) if name in cuts else shared[name]) for name in stage.inputs}
            out = stage.run(feeds)
            del feeds
            for value in cuts.values():
                if isinstance(value, list):
                    value[a] = None
            for name in mine:
                _place(buffers, name, out.pop(self.interleaved[name]["phases"]), self.interleaved[name],
                       self.factors[:k], prefix + (a,), n)
            if k < self.depth:
                deeper = self._moved_here(k, out) if k in self.in_numpy else {name: out.pop(name) for name in self.cuts[k] if name in out}
                del out
                self._run_level(k + 1, shared, deeper, prefix + (a,), n, buffers)


def _moved(source: np.ndarray, axes: Sequence[int], factor: Sequence[int]) -> list[np.ndarray]:
    """The tensor of phases the rewrite's moves make from ``source`` (passes/fragments.py,
    _split_after), one contiguous array per phase (row-major over the phase axes): phase ``a``,
    batch entries ``a*N .. a*N + N`` of the graph's tensor, is positions ``a_t + f_t * i`` of
    ``source`` along its last spatial axes, the first ``D // f`` of them. One copy of the map
    in all (the graph's moves, a crop copied and a copy per transposed axis, held up to three),
    and each phase's array can go once its phase has run (:meth:`BatchPlan._run_level`)."""
    windows = list(source.shape)
    for a, f in zip(axes, factor):
        windows[a] //= f
    return [np.ascontiguousarray(_phase_view(source, axes, factor, phase)[_first(windows, axes)])
            for phase in np.ndindex(*factor)]


def _batch(value) -> int:
    """Batch size of a tensor of phases (an array, or :func:`_moved`'s list of one per phase)."""
    return sum(part.shape[0] for part in value) if isinstance(value, list) else value.shape[0]


def _phase(value, a: int, size: int) -> np.ndarray:
    """Phase ``a``'s ``size`` batch entries of a tensor of phases (no copy)."""
    return value[a] if isinstance(value, list) else value[a * size:(a + 1) * size]


def _place(buffers: dict, name: str, value: np.ndarray, spec: dict, factors: Sequence[Sequence[int]],
           phase: Sequence[int], n: int) -> None:
    """Write the run of phase ``phase`` (one flat index per split level) into output ``name``.

    ``value``: that run's share of the output's tensor of phases, batch ``outer * n`` (the
    levels not split, outermost first: ``((a_m * f_{m-1} + ...) + a_{k+1}) * n + b``). Output
    position ``j = a_1 + f_1 * (a_2 + f_2 * (... + f_m * i))``, as the graph's batch-to-space
    puts it: the run fills ``j = start + step * i'`` with ``start`` from its phases and ``step``
    the product of the split levels' factors, ``i'`` interleaving the levels not split.
    """
    axes = list(spec["axes"])
    k_axes = len(axes)
    if spec["inserted"]:  # (B, K) -> (B, K, 1, 1): one prediction per phase
        value = value.reshape(value.shape + (1,) * k_axes)
    deeper = spec["levels"][len(factors):]
    m = len(deeper)
    outer = [f for level in reversed(deeper) for f in level]  # outermost level first
    rest = list(value.shape[1:])
    x = value.reshape(outer + [n] + rest)
    # axes of x: level l (0 = outermost) axis t at l*k + t; batch at m*k; value axis i >= 1 at m*k + i
    perm = [m * k_axes]
    for i in range(1, value.ndim):
        perm.append(m * k_axes + i)
        if i in axes:
            perm.extend(level * k_axes + axes.index(i) for level in range(m))
    merged = [n] + [d * math.prod(level[axes.index(i)] for level in deeper) if i in axes else d
                    for i, d in enumerate(rest, start=1)]
    z = x.transpose(perm).reshape(merged)
    step = [math.prod(f[t] for f in factors) for t in range(k_axes)]
    start = [0] * k_axes
    scale = [1] * k_axes
    for f, a in zip(factors, phase):
        for t, p in enumerate(np.unravel_index(a, f)):
            start[t] += int(p) * scale[t]
            scale[t] *= f[t]
    if name not in buffers:
        shape = [d * step[axes.index(i)] if i in axes else d for i, d in enumerate(merged)]
        buffers[name] = np.empty(shape, dtype=z.dtype)
    index = [slice(None)] * z.ndim
    for t, a in enumerate(axes):
        index[a] = slice(start[t], None, step[t])
    buffers[name][tuple(index)] = z


def levels_of(info: metadata.DenseInfo) -> int:
    """How many levels deep the metadata lets the batch split (DenseError saying why none)."""
    batches = info.batches
    if batches is None:
        raise DenseError("this 'fragments' model was written before onnx-dense recorded how its batch of phases "
                         "splits; rewrite it again to run it phase by phase")
    if "refused" in batches:
        raise DenseError(f"its phases run in one graph: {batches['refused']}")
    return len(batches["levels"])


def layout(proto: onnx.ModelProto, info: metadata.DenseInfo, input_name: str, depth: int | None = None) -> BatchPlan:
    """The stages of ``proto`` (weights not needed), split ``depth`` levels deep (None: as deep
    as the metadata and the graph allow; fewer where a stage would read a deeper one's tensors
    of another batch); DenseError saying why there are none."""
    most = levels_of(info)
    depth = most if depth is None else max(1, min(int(depth), most))
    while True:
        try:
            return _layout(proto, info, input_name, depth)
        except _TooDeep:
            if depth == 1:
                raise DenseError("a stage reads tensors of phases of another batch; cannot split it") from None
            depth -= 1


class _TooDeep(Exception):
    pass


def _rank(types: Mapping, name: str, spatial: int) -> int:
    """A value's rank from the graph's types (batch, channels and spatial axes if not known)."""
    return len(types.get(name, (None, None))[1] or ()) or (spatial + 2)


# What the rewrite's moves to the batch are made of (passes/fragments.py): shape arithmetic and copies.
_MOVES = frozenset({"Shape", "Slice", "Div", "Mul", "Concat", "Reshape", "Transpose", "Pad", "Gather", "Unsqueeze",
                    "Squeeze", "Cast", "ConstantOfShape", "Expand", "Identity"})


def _trunk_and_moves(nodes: list[onnx.NodeProto], cuts: Sequence[str], sources: Mapping[str, dict],
                     producer: Mapping[str, onnx.NodeProto], level: Mapping) -> tuple[list, list, str | bool]:
    """A stage's nodes as the rest and a level's moves (what leads from the maps they read to
    the tensors of phases), and True; or (nodes, [], why not). For level 1, the rest is the
    trunk: the original network up to the maps."""
    if "sources" not in level:
        return nodes, [], "it was written before onnx-dense recorded the maps they read (rewrite it again)"
    if not sources:
        return nodes, [], "the maps they read have no single window per position"
    in_stage = {id(n) for n in nodes}
    found: set[int] = set()
    stack = list(cuts)
    while stack:  # back from the tensors of phases to the maps
        value = stack.pop()
        node = producer.get(value)
        if value in sources or node is None or id(node) not in in_stage or id(node) in found:
            continue
        found.add(id(node))
        stack.extend(i for i in node.input if i)
    derived = set(sources)  # every move must follow from the maps (else it would take trunk nodes along)
    for node in nodes:
        if id(node) in found:
            if node.op_type not in _MOVES or not any(i in derived for i in node.input):
                return nodes, [], f"node {node_label(node)} is not part of them (a map they read has no single window per position)"
            derived.update(o for o in node.output if o)
    trunk = [node for node in nodes if id(node) not in found]
    if any(i in derived and i not in sources for node in trunk for i in node.input):
        return nodes, [], "the trunk reads a value of the moves"
    return trunk, [node for node in nodes if id(node) in found], True


def _layout(proto: onnx.ModelProto, info: metadata.DenseInfo, input_name: str, depth: int) -> BatchPlan:
    batches = info.batches
    entry = info.inputs.get(input_name)
    if entry is None:
        raise DenseError(f"input '{input_name}' has no spatial axes in the model's metadata")
    graph = proto.graph
    init_names = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in init_names]
    levels = batches["levels"][:depth]
    factors = tuple(tuple(level["factor"]) for level in levels)
    cuts = tuple(tuple(level["cuts"]) for level in levels)
    cut_depth = {name: k + 1 for k, names in enumerate(cuts) for name in names}
    outputs = [o.name for o in graph.output]
    interleaved = {o: batches["outputs"][o] for o in outputs if o in batches["outputs"]}
    made = {o for node in graph.node for o in node.output if o}
    missing = [c for c in (*cut_depth, *(s["phases"] for s in interleaved.values())) if c not in made]
    if missing:
        raise DenseError(f"value '{missing[0]}' named in the metadata's batches is not in the graph; "
                         "rewrite the model again")
    producer = {o: node for node in graph.node for o in node.output if o}
    # the outputs' batch-to-space: from each output back to its tensor of phases
    interleave: set[int] = set()
    for name, spec in interleaved.items():
        stack = [name]
        while stack:
            value = stack.pop()
            node = producer.get(value)
            if node is None or value == spec["phases"] or id(node) in interleave:
                continue
            interleave.add(id(node))
            stack.extend(i for i in node.input if i)
    interleaved_values = {o for node in graph.node if id(node) in interleave for o in node.output if o}
    for node in graph.node:
        if id(node) not in interleave and any(i in interleaved_values for i in node.input):
            raise DenseError(f"node {node_label(node)} reads an output after its batch-to-space; "
                             "cannot split the batch of phases")
    # each node's stage: the deepest level of phases among its inputs (a level's moves make
    # values of that level; the moves themselves run with their input's)
    level_of: dict[str, int] = {name: 0 for name in inputs}
    constant_nodes: dict[str, onnx.NodeProto] = {}
    stage_nodes: list[list[onnx.NodeProto]] = [[] for _ in range(depth + 1)]
    for node in graph.node:
        ins = [i for i in node.input if i]
        known = [level_of[i] for i in ins if i in level_of]
        if not known:
            constant_nodes.update((o, node) for o in node.output if o)
            continue
        k = max(known)
        for o in node.output:
            if o:
                level_of[o] = cut_depth.get(o, k)
        if id(node) not in interleave:
            stage_nodes[k].append(node)
    for name, spec in interleaved.items():
        if level_of.get(spec["phases"], 0) == 0:
            raise DenseError(f"output '{name}' is recorded as made of phases but is not; rewrite the model again")
    for o in outputs:
        if o not in interleaved and level_of.get(o, 0) > 0:
            raise DenseError(f"output '{o}' is made from the tensors of phases but its batch-to-space is not recorded; "
                             "rewrite the model again")
    types = _value_types(proto, info, input_name)
    n = len(entry.spatial_axes)
    # Each level's moves apart from the stage that runs them (level 1's: from the trunk, which
    # can then be tiled); where the tensors of phases are every f-th position of their maps,
    # the moves are done in numpy (in_numpy: one copy of the map, which is then dropped).
    apart, in_numpy, moves0 = "", set(), []
    for k in range(depth):
        sources = levels[k].get("sources") or {}
        rest, moves, why = _trunk_and_moves(stage_nodes[k], cuts[k], sources, producer, levels[k])
        every = why is True and sorted(c for spec in sources.values() for c in spec["cuts"]) == sorted(cuts[k]) and all(
            spec["every"] and len(spec["cuts"]) == 1
            and spec["axes"] == list(range(_rank(types, name, n) - n, _rank(types, name, n)))
            for name, spec in sources.items())
        if k == 0:
            apart = why
        if every:
            stage_nodes[k] = rest
            in_numpy.add(k)
        elif k == 0 and why is True:
            stage_nodes[0], moves0 = rest, moves
    groups = [(0, stage_nodes[0])] + ([(0, moves0)] if moves0 else [])
    groups += [(k, nodes) for k, nodes in enumerate(stage_nodes) if k]
    kept = {k: set(levels[k]["sources"]) for k in in_numpy}  # maps a stage hands on instead of its moves
    stages: list[Stage] = []
    reads: list[list[str]] = []
    for k, nodes in groups:
        own = {o for node in nodes for o in node.output if o}
        need: list[str] = []
        for node in nodes:
            for i in node.input:
                if i and i not in own and i not in init_names and i not in constant_nodes and i not in need:
                    need.append(i)
        for i in need:
            source = level_of.get(i, 0)
            if k and source and not (i in cut_depth and cut_depth[i] == k):
                raise _TooDeep  # a value of another batch (an upper level's run): not split here
        reads.append(need)
    later = [set().union(*reads[g + 1:]) for g in range(len(groups))]
    made_at = {o: level_of[spec["phases"]] for o, spec in interleaved.items()}
    cumulative = (1,) * len(entry.spatial_axes)
    for g, (k, nodes) in enumerate(groups):
        outs = [o for node in nodes for o in node.output
                if o and (o in later[g] or (k == 0 and o in outputs and o not in interleaved) or o in kept.get(k, ()))]
        outs += [spec["phases"] for o, spec in interleaved.items() if made_at[o] == k]
        split = factors[k - 1] if k else cumulative
        if k:
            cumulative = tuple(a * b for a, b in zip(cumulative, split))
        stages.append(Stage(g, cumulative, split, nodes, reads[g], outs, divide=False))
    # dims left symbolic in the stages' inputs and outputs: the batch, and the spatial axes
    axes: dict[str, tuple[int, ...]] = {input_name: tuple(entry.spatial_axes)}
    for name in cut_depth:
        rank = _rank(types, name, n)
        axes[name] = (0,) + tuple(range(rank - n, rank))
    for spec in interleaved.values():
        axes[spec["phases"]] = (0,) + tuple(a for a in spec["axes"] if not spec["inserted"])
    for k in range(depth if apart is True else 0):
        for name, spec in (levels[k].get("sources") or {}).items():
            axes[name] = (0,) + tuple(spec["axes"])
    plan = BatchPlan(stages, input_name, {}, outputs, factors=factors, cuts=cuts,
                     interleaved=interleaved, made_at=made_at, moves=apart, in_numpy=frozenset(in_numpy),
                     sources=tuple(dict(levels[k].get("sources") or {}) for k in range(depth)))
    plan._types, plan._constants, plan._axes = types, constant_nodes, axes
    return plan
