"""Tiled runs of a dense model whose stitched output equals the untiled output exactly.

Why it can be exact. Every op of a dense model is local and translation-equivariant, so a
prediction computed on a crop of the image equals the whole-image prediction when two
things hold on each side of the crop (per spatial axis, in input pixels; ``s`` the dense
grid's stride, ``a`` = ``rf_start`` and ``R`` = ``rf_size`` from the model's metadata):

* the crop starts at a multiple of every stride the model keeps (a multiple of ``s``,
  which is their product), so every strided layer samples the same phase as on the whole
  image, and local prediction ``j`` of a crop at ``o`` is global prediction ``j + o/s``;
* either the crop's side is the image's side (the model pads there exactly as on the
  whole image), or the prediction's receptive field ``[a + j*s, a + j*s + R)`` lies inside
  the crop. ``a`` counts the padding of every layer (it is negative for padded nets), so
  a field inside the crop never reaches a position that some layer padded at the crop's
  edge but that is real on the whole image: such a position's own field leaves the crop.

A crop of ``T`` pixels whose sides are both interior therefore gives exact predictions
``jl = max(0, ceil(-a/s)) <= j <= jr = floor((T - R - a)/s)``: ``m = jr - jl + 1`` of them.
Tiles step by ``m*s`` (the largest step that leaves no gap, rounded down to a common multiple
of every output's stride), overlap by about ``R`` pixels, and each owns the predictions from
its first exact one up to the next tile's first exact one. The last tile on an axis is moved
back so that it ends on the image's end (its start still aligned), which keeps it at most
``T`` pixels and never pads the image; where that would leave it shorter than a receptive
field, it starts a stride earlier until it holds one (it can then exceed ``T`` by less than
a stride). A tile that holds a whole field gives every layer a whole window, so each
layer's length on it is the image's less ``start / s_l`` exactly; on fewer pixels,
onnxruntime counts a window that does not fit as one (a 2-wide pool on 1 pixel gives one
prediction) or refuses the run. Because of the two conditions, each prediction is
computed on a crop it cannot tell from the whole image: the stitched map is the untiled map,
computed by the same kernels at other sizes (on the CPU provider bit for bit in the tests; a
kernel that picks its algorithm by size, as cuDNN does, can differ in round-off).

Tiles are as long as the image modulo ``s`` (all but the last are shortened by less than
``s``, or lengthened by less than ``s`` where the shorter length would leave a tile no exact
prediction; the last, aligned and ending on the image's end, is so anyway). A layer's
output length is ``floor((n + c)/s_l) + 1`` (ceil in ceil mode): a length changed by a multiple
of ``s`` (a multiple of every stride before it) changes every branch of a join by the same
whole count, so branches that agree on the image agree on each tile, whichever padding made
them agree there (a strided 1x1 conv beside a 3x3 without pads, say).

What breaks the argument is refused before any tile runs (:func:`check_tileable`): ops that
look at the whole map (global pooling, Resize, InstanceNorm, softmax or reductions over a
spatial axis, concatenation along it), crops (Slice, negative Pad: they shift what a crop's
edge padding reaches; all but the rewrite's own join crops, below), ``auto_pad=SAME`` on
strided windows (its padding depends on the size) and graphs with control flow. Which axes
of an intermediate tensor are spatial is found by running ONNX shape inference at two input
sizes (:func:`infer_static`): the axes whose size changes.

The crops that tile (:func:`_shortest_crops`) are those the rewrite puts before a join whose
dense branches differ in length (``passes/align_joins.py``): a Slice from 0, step 1, to the
least of the operands' run-time lengths on the same axes. It moves no position and cuts
only positions some operand lacks; on a tile, an operand lacks a position only where its
window leaves the tile, so no exact prediction reads what was cut, and a tile ending on the
image's end cuts what the whole run cuts there (every operand's length falls by the same
``start / s``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from onnx_dense import metadata
from onnx_dense.errors import DenseError, node_label
from onnx_dense.runtime import windowed
from onnx_dense.runtime.buffers import Buffers

# Ops that look at the whole map, or whose output positions do not map to fixed input windows.
NONLOCAL_OPS = {
    "Resize", "Upsample", "DepthToSpace", "SpaceToDepth", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "InstanceNormalization", "GroupNormalization", "MeanVarianceNormalization",
    "Col2Im", "RoiAlign", "MaxRoiPool", "GridSample", "AffineGrid", "NonMaxSuppression", "MaxUnpool",
    "Loop", "If", "Scan", "DFT", "STFT", "NonZero", "Compress", "Unique", "CenterCropPad",
    "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial",
}
REDUCE_OPS = {
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
}
# op -> (attribute, default) of the single axis it works along
AXIS_OPS = {
    "ArgMax": 0, "ArgMin": 0, "LpNormalization": -1, "Concat": None, "Split": 0, "Gather": 0,
    "GatherElements": 0, "ScatterElements": 0, "TopK": -1,
}
WINDOW_OPS = {"Conv", "MaxPool", "AveragePool", "LpPool", "ConvTranspose", "ConvInteger", "QLinearConv"}


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
    """One output's dense grid along one input axis (from the metadata)."""

    stride: int
    rf_start: int
    rf_size: int

    def first_exact(self) -> int:
        """Local index of the first prediction whose field starts inside a crop (``jl``)."""
        return max(0, -(self.rf_start // self.stride))  # ceil(-a / s), at least 0

    def last_exact(self, extent: int) -> int:
        """Local index of the last prediction whose field ends inside a crop of ``extent`` (``jr``)."""
        return (extent - self.rf_size - self.rf_start) // self.stride


@dataclasses.dataclass(frozen=True)
class AxisTile:
    """A span ``[start, stop)`` of the input along one axis, and what it owns of each output."""

    start: int
    stop: int
    own_from: tuple[int, ...]  # per output: first global prediction this tile writes
    own_to: tuple[int | None, ...]  # per output: one past the last; None for "to the end of the tile"


def plan_axis(extent: int, tile: int, geometries: Sequence[Geometry], axis_name: str = "axis") -> list[AxisTile]:
    """Tiles along one axis of ``extent`` input pixels, at most ``tile`` pixels each."""
    n_out = len(geometries)
    align = math.lcm(*(g.stride for g in geometries))
    if extent > tile:  # see the module docstring: joins whose branches agree on the image agree on each tile
        congruent = tile - (tile - extent) % align
        if congruent < tile and (congruent < align or _step(congruent, geometries, align) < align):
            congruent += align  # too short to shorten: the next such length, less than a stride longer
        if _step(congruent, geometries, align) >= align:
            tile = congruent
    if extent <= tile:
        return [AxisTile(0, extent, (0,) * n_out, (None,) * n_out)]
    step = _step(tile, geometries, align)
    if step < align or tile < align:  # a tile shorter than a stride could leave the last one no pixel
        need = minimum_tile(geometries)
        raise DenseError(
            f"tile of {tile} pixels along the {axis_name} is too small for the receptive field "
            f"({', '.join(str(g.rf_size) for g in geometries)} pixels): use a tile of at least {need}"
        )
    last_start = -(-(extent - tile) // align) * align  # ceil to the alignment
    field = max(g.rf_size for g in geometries)
    while extent - last_start < field and last_start >= align:  # see the module docstring: a whole field
        last_start -= align
    starts = list(range(0, last_start, step)) + [last_start]
    tiles = []
    for i, start in enumerate(starts):
        stop = extent if i == len(starts) - 1 else start + tile
        own_from = tuple(0 if i == 0 else start // g.stride + g.first_exact() for g in geometries)
        if i == len(starts) - 1:
            own_to: tuple[int | None, ...] = (None,) * n_out
        else:
            nxt = starts[i + 1]
            own_to = tuple(nxt // g.stride + g.first_exact() for g in geometries)
        tiles.append(AxisTile(start, stop, own_from, own_to))
    return tiles


def _step(tile: int, geometries: Sequence[Geometry], align: int) -> int:
    step = min((g.last_exact(tile) - g.first_exact() + 1) * g.stride for g in geometries)
    return (step // align) * align if step > 0 else 0


def minimum_tile(geometries: Sequence[Geometry]) -> int:
    """The smallest tile that leaves every output at least one exact prediction per tile."""
    align = math.lcm(*(g.stride for g in geometries))
    tile = max(align, *(g.rf_size for g in geometries))
    while _step(tile, geometries, align) < align:
        tile += 1
    return tile


def minimum_tile_anywhere(geometries: Sequence[Geometry]) -> int:
    """:func:`minimum_tile`, also for maps whose size at the image's size is not known (a
    model's trunk: no ``minimum_input`` guards it). The last tile, moved back to end on the
    image's end and aligned, can be up to ``align - 1`` pixels shorter than the others; this
    leaves it a whole field after its first exact prediction, which starts less than a
    stride into it."""
    align = math.lcm(*(g.stride for g in geometries))
    return max(minimum_tile(geometries), max(g.rf_size + g.stride - 1 for g in geometries) + align - 1)


@dataclasses.dataclass(frozen=True)
class OutputAxes:
    """Where an output's spatial axes are, and its geometry along each input spatial axis."""

    name: str
    axes: tuple[int, ...]  # output tensor axes, in the input's spatial order
    geometry: tuple[Geometry, ...]


def output_axes(info: metadata.DenseInfo, input_name: str, output_names: Sequence[str]) -> list[OutputAxes]:
    result = []
    for name in output_names:
        out = info.outputs.get(name)
        if out is None:
            raise DenseError(
                f"output '{name}' has no dense grid in the model's metadata (no spatial axes), so tiles "
                "cannot be stitched; run without tiling"
            )
        if out.input != input_name:
            raise DenseError(f"output '{name}' is computed from input '{out.input}', not '{input_name}'; run without tiling")
        geometry = tuple(Geometry(s, a, r) for s, a, r in zip(out.stride, out.rf_start, out.rf_size))
        result.append(OutputAxes(name, tuple(out.spatial_axes), geometry))
    return result


def parse_tile(tile, rank: int) -> tuple[int, ...]:
    """``512`` -> (512, 512); ``(512, 256)`` or ``'512x256'`` -> per spatial axis (height first)."""
    if isinstance(tile, str):
        parts = [p for p in tile.lower().replace("x", ",").split(",") if p.strip()]
        try:
            tile = tuple(int(p) for p in parts)
        except ValueError:
            raise DenseError(f"--tile '{tile}': expected a positive integer or one per spatial axis such as 512x384") from None
    if isinstance(tile, (int, np.integer)):
        tile = (int(tile),) * rank
    tile = tuple(int(t) for t in tile)
    if len(tile) == 1:
        tile = tile * rank
    if len(tile) != rank or any(t < 1 for t in tile):
        raise DenseError(f"tile {tile}: expected a positive size for each of the {rank} spatial axes")
    return tile


# --------------------------------------------------------------------------------------------
# running the plan
# --------------------------------------------------------------------------------------------


def run_tiled(
    run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
    feeds: Mapping[str, np.ndarray],
    input_name: str,
    input_axes: Sequence[int],
    outputs: Sequence[OutputAxes],
    tile: Sequence[int],
    progress: Callable[[int, int], None] | None = None,
    reuse: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``run`` on tiles of ``feeds[input_name]`` and stitch each output.

    ``run`` takes a feeds dict and returns numpy outputs by name (at least those of
    ``outputs``). Other feeds are passed whole to every tile; the image may be a
    :class:`windowed.WindowedInput`, of which each tile computes its window. ``reuse``: ``run(feeds,
    buffers)`` takes the tile as a view and copies it, and writes its outputs, into buffers
    shared by every tile (:mod:`onnx_dense.runtime.buffers`); each tile's outputs are
    stitched before the next tile runs (crop 0 comes first, so none waits).
    """
    x = feeds[input_name]
    crops = plan_tiles(x.shape, input_axes, outputs, tile)
    stitcher = Stitcher(outputs, crops)
    shared = Buffers() if reuse else None
    for done, crop in enumerate(crops):
        tile_feeds = dict(feeds)
        if shared is None:
            tile_feeds[input_name] = np.ascontiguousarray(x[crop.index])
            stitcher.add(crop, run(tile_feeds))
        else:
            if isinstance(x, windowed.WindowedInput):  # computed into the tiles' one buffer
                shape = tuple(len(range(*s.indices(n))) for s, n in zip(crop.index, x.shape))
                tile_feeds[input_name] = x.read(crop.index, shared.array(("window", input_name), shape, x.dtype))
            else:
                tile_feeds[input_name] = x[crop.index]
            result = run(tile_feeds, shared)
            if stitcher.waits(crop):  # held past the next run: out of the shared buffers
                result = {k: v.copy() for k, v in result.items()}
            stitcher.add(crop, result)
        if progress is not None:
            progress(done + 1, len(crops))
    return stitcher.result()


@dataclasses.dataclass(frozen=True)
class Crop:
    """One tile of the input: its slice of the input array and its span along each spatial axis."""

    number: int  # position in the plan; 0 is the tile that ends on the image's end on every axis
    index: tuple[slice, ...]  # x[crop.index] is the tile
    spans: tuple[AxisTile, ...]


def plan_tiles(shape: Sequence[int], input_axes: Sequence[int], outputs: Sequence[OutputAxes],
               tile: Sequence[int]) -> list[Crop]:
    """The tiles of an input of ``shape``, the last tile on every axis first (it tells each output's size)."""
    per_axis = []
    for k, axis in enumerate(input_axes):
        geometries = [o.geometry[k] for o in outputs]
        per_axis.append(plan_axis(int(shape[axis]), int(tile[k]), geometries, _axis_name(k, len(input_axes))))
    grid = np.indices([len(p) for p in per_axis]).reshape(len(per_axis), -1).T
    order = [tuple(idx) for idx in grid]
    order = order[-1:] + order[:-1]
    crops = []
    for number, idx in enumerate(order):
        spans = tuple(per_axis[k][i] for k, i in enumerate(idx))
        index = [slice(None)] * len(shape)
        for k, axis in enumerate(input_axes):
            index[axis] = slice(spans[k].start, spans[k].stop)
        crops.append(Crop(number, tuple(index), spans))
    return crops


class Stitcher:
    """Puts each tile's outputs where the plan says, in any order the tiles come back.

    An output's full size is known from crop 0 (the last tile on every axis); tiles that
    arrive before it wait. ``result()`` once every crop was added. ``allocate(name, shape,
    dtype)`` makes each output's array (default: in memory; :class:`windowed.DiskOutputs`: a
    .npy file on disk, whose pages are given back after each tile).
    """

    def __init__(self, outputs: Sequence[OutputAxes], crops: Sequence[Crop],
                 allocate: Callable[[str, tuple, np.dtype], np.ndarray] | None = None) -> None:
        self.outputs = list(outputs)
        self.allocate = allocate or (lambda name, shape, dtype: np.empty(shape, dtype=dtype))
        self.remaining = {c.number for c in crops}
        self.stitched: dict[str, np.ndarray] = {}
        self._waiting: list[tuple[Crop, Mapping[str, np.ndarray]]] = []

    def add(self, crop: Crop, result: Mapping[str, np.ndarray]) -> None:
        if crop.number not in self.remaining:
            raise RuntimeError(f"tile {crop.number} stitched twice (a bug in the caller)")
        self.remaining.discard(crop.number)
        if self.waits(crop):
            self._waiting.append((crop, result))
            return
        self._place(crop, result)
        while self._waiting:
            self._place(*self._waiting.pop())

    def waits(self, crop: Crop) -> bool:
        """Whether :meth:`add` would hold this tile's result (until crop 0 gives the outputs' sizes)."""
        return not self.stitched and crop.number != 0

    def result(self) -> dict[str, np.ndarray]:
        if self.remaining:
            raise RuntimeError(f"tiles {sorted(self.remaining)} were never stitched (a bug in the caller)")
        return self.stitched

    def _place(self, crop: Crop, result: Mapping[str, np.ndarray]) -> None:
        spans = crop.spans
        for j, out in enumerate(self.outputs):
            value = np.asarray(result[out.name])
            if out.name not in self.stitched:  # the last tile: the output's full size
                shape = list(value.shape)
                for k, axis in enumerate(out.axes):
                    shape[axis] = spans[k].start // out.geometry[k].stride + value.shape[axis]
                self.stitched[out.name] = self.allocate(out.name, tuple(shape), value.dtype)
            target = self.stitched[out.name]
            src = [slice(None)] * value.ndim
            dst = [slice(None)] * value.ndim
            for k, axis in enumerate(out.axes):
                span, g = spans[k], out.geometry[k]
                offset = span.start // g.stride
                lo = span.own_from[j]
                hi = target.shape[axis] if span.own_to[j] is None else span.own_to[j]
                if hi - offset > value.shape[axis] or lo < offset:
                    raise RuntimeError(
                        f"tile {span.start}:{span.stop} of output '{out.name}' has {value.shape[axis]} predictions "
                        f"along axis {axis}, fewer than the {hi - offset} the plan needs (a bug in the tiling)"
                    )
                src[axis] = slice(lo - offset, hi - offset)
                dst[axis] = slice(lo, hi)
            target[tuple(dst)] = value[tuple(src)]
            windowed.release(target)  # an output stitched on disk: its pages leave this process


def _axis_name(k: int, rank: int) -> str:
    names = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}.get(rank)
    return names[k] if names else f"spatial axis {k}"


# --------------------------------------------------------------------------------------------
# which graphs tile exactly
# --------------------------------------------------------------------------------------------


def check_tileable(proto: onnx.ModelProto, info: metadata.DenseInfo, input_name: str,
                   nodes: Sequence[onnx.NodeProto] | None = None) -> None:
    """Raise DenseError naming the first node that would make a tiled run differ from an untiled one
    (of ``nodes`` only, if given: a part of the graph that is tiled on its own, such as the trunk
    of a phase schedule, which is the original network whatever the strategy or what follows)."""
    if nodes is None and info.strategy != "dilate":
        raise DenseError(
            f"this model was rewritten with strategy '{info.strategy}', whose phases read a zero extension that "
            "depends on the map's size, so tiles would not match the whole image; run without --tile, or "
            "rewrite with --strategy dilate"
        )
    if nodes is None and (getattr(info, "per_phase_global", False)
                          or any(getattr(o, "off_grid", "exact") == "global" for o in info.outputs.values())):
        raise DenseError(
            "this model computes global context (per-phase means over the whole map), so tiles would not match "
            "the whole image; run without --tile"
        )
    spatial = _spatial_axes(proto, info, input_name)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    constants = _constants(proto)
    crops = _shortest_crops(proto, constants)
    for node in (proto.graph.node if nodes is None else nodes):
        if node.op_type == "Slice" and node.output and node.output[0] in crops:
            continue
        reason = _nonlocal_reason(node, spatial, constants, opset)
        if reason:
            raise DenseError(
                f"node {node_label(node)}: {reason}, so tiles would not match the whole image; run without --tile"
            )


def _shortest_crops(proto: onnx.ModelProto, constants: dict[str, list[int]]) -> dict[str, tuple[list[int], set[str]]]:
    """The Slices that crop their data to the least of run-time lengths of values that include
    it, from 0 with step 1 on the same axes: ``Slice(v, 0, Min(Gather(Shape(u), axes) ...),
    axes)`` with ``v`` among the ``u``; by output name, their axes and those ``u``. See the
    module docstring for why they tile."""
    made = {out: node for node in proto.graph.node for out in node.output}

    def lengths_of(name: str, axes: list[int]) -> set[str] | None:
        """The values whose lengths on ``axes`` the Min named ``name`` takes the least of."""
        least = made.get(name)
        if least is None or least.op_type != "Min" or least.domain not in ("", "ai.onnx"):
            return None
        sources = set()
        for operand in least.input:
            gather, shape = made.get(operand), None
            if gather is not None and gather.op_type == "Gather" and len(gather.input) == 2:
                shape = made.get(gather.input[0])
            if (shape is None or shape.op_type != "Shape" or len(shape.attribute)
                    or any(a.name == "axis" and a.i != 0 for a in gather.attribute)
                    or constants.get(gather.input[1]) != axes):
                return None
            sources.add(shape.input[0])
        return sources

    crops = {}
    for node in proto.graph.node:
        if node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or len(node.input) < 4:
            continue
        axes = constants.get(node.input[3])
        starts = constants.get(node.input[1])
        steps = constants.get(node.input[4]) if len(node.input) > 4 and node.input[4] else [1] * len(axes or [])
        if axes is None or starts is None or steps is None or len(starts) != len(axes) or len(steps) != len(axes):
            continue
        if any(starts) or any(s != 1 for s in steps):
            continue
        sources = lengths_of(node.input[2], axes)
        if sources and node.input[0] in sources:
            crops[node.output[0]] = (axes, sources)
    return crops


def _nonlocal_reason(node: onnx.NodeProto, spatial, constants, opset: int) -> str | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"an op of domain '{node.domain}', whose reach is unknown"
    if op in NONLOCAL_OPS:
        return "it looks at the whole map, not a fixed window"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    data = node.input[0] if node.input else ""
    axes_of = spatial.get(data)  # set of spatial axes of the node's first input, or None if unknown
    rank = _rank(spatial, data)

    def touches(axes: Sequence[int] | None) -> bool:
        if axes_of is None:
            return True  # unknown layout: assume the worst
        if axes is None:
            return bool(axes_of)
        return any((a % rank if rank else a) in axes_of for a in axes)

    if op in WINDOW_OPS:
        pads = attrs.get("pads")
        if pads is not None and any(p < 0 for p in pads):
            return "negative pads crop the map"
        strides = attrs.get("strides") or []
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad.startswith("SAME") and any(s > 1 for s in strides):
            return f"auto_pad={auto_pad} with stride {list(strides)} pads by the input size"
        if op == "ConvTranspose" and any(s > 1 for s in strides):
            return "a strided ConvTranspose upsamples"
        return None
    if op in REDUCE_OPS:
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = constants.get(node.input[1])
            if axes is None:
                return "it reduces over axes computed at run time"
        if axes is None or len(axes) == 0:
            if attrs.get("noop_with_empty_axes", 0):
                return None
            return "it reduces over every axis" if touches(None) else None
        return "it reduces over a spatial axis" if touches(list(axes)) else None
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        axis = attrs.get("axis", 1 if opset < 13 else -1)
        if opset < 13:
            if rank is None:
                return "it normalises over axes whose layout is unknown"
            return "it normalises over a spatial axis" if touches(list(range(axis % rank, rank))) else None
        return "it normalises over a spatial axis" if touches([axis]) else None
    if op == "LayerNormalization":
        axis = attrs.get("axis", -1)
        if rank is None:
            return "it normalises over axes whose layout is unknown"
        return "it normalises over a spatial axis" if touches(list(range(axis % rank, rank))) else None
    if op == "Flatten":
        return "it folds spatial axes into features" if touches(None) else None
    if op in AXIS_OPS:
        axis = attrs.get("axis", AXIS_OPS[op])
        if axis is None:
            return None
        return f"it works along spatial axis {axis}" if touches([axis]) else None
    if op == "CumSum":
        axis = constants.get(node.input[1]) if len(node.input) > 1 else None
        return "it accumulates along a spatial axis" if axis is None or touches(list(axis)) else None
    if op == "Slice":
        if len(node.input) > 3 and node.input[3]:
            axes = constants.get(node.input[3])
        elif len(node.input) > 1:
            starts = constants.get(node.input[1])
            axes = list(range(len(starts))) if starts is not None else None
        else:
            axes = attrs.get("axes") or (list(range(len(attrs.get("starts", [])))))
        if axes is None:
            return "it slices axes computed at run time"
        return "it crops a spatial axis" if touches(list(axes)) else None
    if op == "Pad":
        pads = constants.get(node.input[1]) if len(node.input) > 1 and node.input[1] else attrs.get("pads")
        if pads is None:
            return "its pads are computed at run time"
        if any(p < 0 for p in pads):
            return "negative pads crop the map"
        return None
    if op == "Tile":
        repeats = constants.get(node.input[1]) if len(node.input) > 1 else None
        if repeats is None:
            return "its repeats are computed at run time"
        return "it repeats along a spatial axis" if touches([i for i, r in enumerate(repeats) if r != 1]) else None
    return None


def _rank(spatial, name) -> int | None:
    return spatial.get(("rank", name))


def _constants(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Small integer constants (axes, pads, starts) by tensor name, flattened."""
    return {name: [int(v) for v in value.reshape(-1)] for name, value in _int_arrays(proto).items()}


def _int_arrays(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Integer initializers of at most 64 elements (in the file) and integer Constant nodes'
    values, by tensor name, with their shapes."""
    values: dict[str, np.ndarray] = {}
    for init in proto.graph.initializer:
        if init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and _numel(init.dims) <= 64 \
                and init.data_location != onnx.TensorProto.EXTERNAL:
            values[init.name] = onnx.numpy_helper.to_array(init)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                    values[node.output[0]] = onnx.numpy_helper.to_array(a.t)
                elif a.name in ("value_int", "value_ints"):
                    values[node.output[0]] = np.array(onnx.helper.get_attribute_value(a), dtype=np.int64)
    return values


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _light_copy(proto: onnx.ModelProto, input_name: str, sizes: dict[int, int]) -> onnx.ModelProto:
    """The graph with big weights replaced by typed inputs and the image input at a static size."""
    light = onnx.ModelProto()
    light.ir_version = proto.ir_version
    light.opset_import.extend(proto.opset_import)
    g = light.graph
    g.name = proto.graph.name
    g.node.extend(proto.graph.node)
    g.output.extend(proto.graph.output)
    init_names = set()
    for init in proto.graph.initializer:
        init_names.add(init.name)
        if _numel(init.dims) <= 64 and init.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(init)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    for vi in proto.graph.input:
        if vi.name in init_names:
            continue
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(vi)
        if vi.name == input_name:
            for axis, size in sizes.items():
                dim = copy.type.tensor_type.shape.dim[axis]
                dim.Clear()
                dim.dim_value = size
        g.input.append(copy)
    for out in g.output:  # stale or symbolic output shapes would only conflict
        out.type.tensor_type.ClearField("shape")
    return light


def infer_static(light: onnx.ModelProto, rounds: int = 64) -> onnx.ModelProto:
    """ONNX shape inference of a :func:`_light_copy` (static size), through shape arithmetic.

    Why not ONNX alone: its data propagation covers few ops (not Div, Min or Max), so a
    Reshape or Slice whose shape is computed from ``Shape`` (the rewrite's join crops; the
    space-to-phase moves of ``fragments`` models) leaves its output, and every value after
    it, without dims, and a memory estimate counts them as one pixel. Here, at the light
    copy's static size, every ``Shape`` of a value with known dims is a constant; each node
    whose inputs are all such small integer constants is evaluated (onnx's reference
    evaluator), its result put in as an initializer where it is read, and inference runs
    again, until nothing new is known. ``light`` is changed in place. Raises what ONNX raises.
    (onnxruntime's symbolic shape inference follows such arithmetic too, but needs sympy,
    which none of our dependencies brings.)
    """
    from onnx.reference import ReferenceEvaluator

    known = {name: value for name, value in _int_arrays(light).items() if value.size <= 64}
    initial = {t.name for t in light.graph.initializer} & set(known)
    put_in = set(initial)
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    for _ in range(rounds):
        dims = {}
        for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            tt = vi.type.tensor_type
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                dims[vi.name] = [d.dim_value for d in tt.shape.dim]
        for node in light.graph.node:
            if not node.output or node.output[0] in known or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Shape":
                if node.input[0] in dims:
                    attrs = {a.name: a.i for a in node.attribute}
                    shape = np.array(dims[node.input[0]], dtype=np.int64)
                    known[node.output[0]] = shape[attrs.get("start", 0):attrs.get("end", len(shape))]
                continue
            if node.op_type in _NOT_FOLDED or not node.input or not all(i == "" or i in known for i in node.input):
                continue
            try:
                values = ReferenceEvaluator(node).run(None, {i: known[i] for i in node.input if i})
            except Exception:  # an op the reference evaluator lacks: left to ONNX's own inference
                continue
            for name, value in zip(node.output, values):
                value = np.asarray(value)
                if value.dtype.kind in "iu" and value.size <= 64:
                    known[name] = value.astype(np.int64) if value.dtype.kind == "u" else value
        # put in what some node reads, from producers all of whose outputs are known (a value
        # cannot be both an initializer and a node's output: the producer goes)
        read = {name for node in light.graph.node for name in node.input}
        gone = [n for n in light.graph.node if n.output and all(o in known for o in n.output)
                and any(o in read and o not in put_in for o in n.output)]
        if not gone:
            break
        for node in gone:
            for name in node.output:
                light.graph.initializer.append(onnx.numpy_helper.from_array(known[name], name))
                put_in.add(name)
        gone_ids = {id(n) for n in gone}
        kept = [n for n in light.graph.node if id(n) not in gone_ids]
        del light.graph.node[:]
        light.graph.node.extend(kept)
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    listed = {vi.name for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    for name in sorted(put_in - listed - initial):  # what was folded keeps its type and shape for callers
        value = known[name]
        inferred.graph.value_info.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
    return inferred


# Not evaluated even on constant inputs: random or stateful ops.
_NOT_FOLDED = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                         "Bernoulli", "If", "Loop", "Scan"})


def _infer(proto: onnx.ModelProto) -> dict[str, list[int | None] | None]:
    try:
        inferred = infer_static(proto)
    except Exception:
        return {}
    shapes: dict[str, list[int | None] | None] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            shapes[vi.name] = None
            continue
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return shapes


def _spatial_axes(proto: onnx.ModelProto, info: metadata.DenseInfo, input_name: str) -> dict:
    """Per tensor, the set of its axes whose size follows the input's size (None: unknown).

    Shape inference runs at the rewrite's static size and at a size larger by a multiple of
    every output's stride; an axis is spatial where the two differ or either is unknown.
    """
    entry = info.inputs.get(input_name)
    if entry is None:
        raise DenseError(f"input '{input_name}' has no spatial axes in the model's metadata; run without tiling")
    strides = [s for out in info.outputs.values() for s in out.stride] or [1]
    delta = 2 * math.lcm(*strides)
    small = dict(zip(entry.spatial_axes, entry.size))
    large = {a: s + delta for a, s in small.items()}
    a = _infer(_light_copy(proto, input_name, small))
    b = _infer(_light_copy(proto, input_name, large))
    spatial: dict = {}
    for name in set(a) | set(b):
        sa, sb = a.get(name), b.get(name)
        if sa is None or sb is None or len(sa) != len(sb):
            spatial[name] = None
            continue
        spatial[name] = {i for i, (x, y) in enumerate(zip(sa, sb)) if x is None or y is None or x != y}
        spatial[("rank", name)] = len(sa)
    return spatial
