"""Tiles and phases for a segmentation model whose final upsampling was rebuilt.

The rebuilt upsampling (``passes/final_upsampling.py``) interpolates the whole dense score map
T, across any tile border, so neither a tile nor a phase of the model can produce it. T is an
output of the dense model too. So such a model runs in two parts:

* the *body*: the model without the rebuilt outputs, ending at T (and the other outputs).
  It is tiled or run phase by phase like any dense model;
* the *tail*: from T to the rebuilt outputs, run once on the stitched T in onnxruntime. It is
  the same graph the whole run executes, so the result is the whole run's.

:func:`split` cuts the model by walking the graph from the rebuilt outputs back to their
score maps. ``onnx.utils.Extractor`` cuts subgraphs too, but it runs shape inference over
the whole model with its weights, and it cannot say which graph inputs a tail reads beyond
the names it is given (a rebuilt Resize may take its size from the image input). A graph
input the tail reads only through ``Shape`` (an image-sized output's length) comes in as that
shape (``shapes``), so the tail never holds a copy of the image.

**Bands.** The tail's output is the image's size, and its Resize (or ConvTranspose) and crop
each hold a map of that size: run once, it can need more memory than the rest of a budgeted
run. Under a budget the session runs it on bands of the score map's rows instead
(:func:`bands_of`, :func:`run_in_bands`). Output pixel y reads the dense score map at
x = (y - offset) / m (onnx_dense/interpolation.py), so the tail run on T's rows a.. computes
the whole run's row y as its row y - m a: the pad, the upsampling by m and the crop all shift
by whole rows. Each band keeps the rows whose x lies in its own rows of T and reads T
:data:`HALO` rows beyond them (cubic reads x - 1 .. x + 2), so the edge the band's pad makes is
never read. That is bit for bit the whole run where the shifted coordinates are computed
exactly: a linear or cubic Resize whose factor along the rows is a power of two (ORT divides
the output's index by it; by 3 or 6 its weights differ by up to 4e-3 between two positions a
band apart), a nearest Resize by any factor (it rounds k + r / m the same for every k), any
bilinear ConvTranspose (integer taps), never align_corners (its coordinates scale with the
whole length). Band starts are multiples of the score map's eST, so the lengths
the tail computes (whole original positions, ceil(D / e)) shift by whole rows too.

**Groups of channels.** Where rows cannot be split exactly (align_corners, a linear or cubic
factor that is not a power of two), a tail that treats each channel alone (pads, resizes and
crops of the spatial axes, elementwise ops with scalars: :func:`channel_axis`) runs on groups
of the score map's channels: the same op on each channel's plane, so every value is the whole
run's, whatever the coordinates. Its sizes must come from the map's shape, not a constant
that names the channel count. A tail with a Softmax, an ArgMax or a Transpose over the
channels runs whole, as before, and the schedule says so.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from onnx_dense import metadata
from onnx_dense.interpolation import half_pixel_fits
from onnx_dense.runtime import windowed

HALO = 2  # rows of the score map read beyond a band's rows [c0, c1): cubic reads floor(x) - 1 .. floor(x) + 2 <= c1 + 1


@dataclasses.dataclass
class Split:
    body: onnx.ModelProto  # every output but the rebuilt ones; onnx_dense metadata for them
    tail: onnx.ModelProto  # score maps (and graph inputs it reads) -> the rebuilt outputs
    tail_inputs: list[str]  # score maps first, then graph inputs, then the shapes below
    rebuilt: list[str]
    shapes: dict[str, str] = dataclasses.field(default_factory=dict)  # tail input -> the graph input it is the Shape of
    # score map -> its channel axis, where the tail computes each channel alone (channel_axis):
    # that dim of the tail's input is left symbolic, so groups of channels can be fed
    channel_axes: dict[str, int] = dataclasses.field(default_factory=dict)


def rebuilt_outputs(info: metadata.DenseInfo) -> list[str]:
    return [name for name, out in info.outputs.items() if out.upsampling]


@dataclasses.dataclass(frozen=True)
class Bands:
    """How the tail runs on row bands of its score map (see the module docstring)."""

    score: str
    axis: int  # the score map's row axis
    est: int  # band starts are multiples of the score map's eST along the rows
    rows: dict[str, tuple[int, int, float]]  # rebuilt output -> (its row axis, m, offset)
    # rebuilt output -> (tail input, index) of its length where the input's size gives it: a
    # band's crop then runs to the whole output's length, past what the band computes right
    sized: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    by: str = "rows"  # "channels": groups of the score map's channels along ``axis`` (est 1, no rows)


def bands_of(info: metadata.DenseInfo, parts: Split) -> Bands | str:
    """The tail's bands, or why it runs whole."""
    descs = {name: info.outputs[name].upsampling for name in parts.rebuilt}
    scores = {d["score"] for d in descs.values()}
    if len(scores) != 1:
        return "it reads several score maps"
    score = scores.pop()
    if set(parts.tail_inputs) - {score} - set(parts.shapes):
        return "it reads a graph input itself"
    first = descs[parts.rebuilt[0]]
    why = _rows_refused(info, parts, descs)
    if not isinstance(why, str):
        rows, sized = why
        return Bands(score, int(first["score_axes"][0]), int(first["score_est"][0]), rows, sized)
    axis = parts.channel_axes.get(score)
    if axis is None:
        return why
    return Bands(score, axis, 1, {}, {}, by="channels")


def _rows_refused(info: metadata.DenseInfo, parts: Split, descs) -> tuple[dict, dict] | str:
    """(rows, sized) of row bands, or why rows cannot be split exactly."""
    rows, sized = {}, {}
    for name, d in descs.items():
        if d.get("sized_by") is not None:
            feed = next((k for k, v in parts.shapes.items() if v == info.outputs[name].input), None)
            if feed is None:
                return "its length is the input's, which it does not read as a shape"
            sized[name] = (feed, int(d["sized_by"][0]))
        if d["align_corners"]:
            return "it is align_corners, whose coordinates scale with the whole length"
        m, offset = int(d["factor"][0]), float(d["offset"][0])
        if d["kind"] == "resize":
            fractional = any(o != int(o) for o in d["offset"])
            half = all(half_pixel_fits(int(f), o) for f, o in zip(d["factor"], d["offset"]))
            factor = 2 * m if fractional and not half else m
            if d["mode"] != "nearest" and factor & (factor - 1):
                return f"its {d['mode']} Resize scales the rows by {factor}, not a power of two"
        rows[name] = (info.outputs[name].spatial_axes[0], m, offset)
    return rows, sized


# Ops that compute each channel from that channel alone, elementwise (with scalars: checked).
_ELEMENTWISE = {"Identity", "Cast", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Abs", "Neg", "Clip", "HardSigmoid",
                "LeakyRelu", "Softplus", "Erf", "Sqrt", "Floor", "Ceil", "Round", "Add", "Sub", "Mul", "Div", "Max",
                "Min", "Pow"}


def channel_axis(tail: onnx.ModelProto, score: str, spatial: tuple[int, ...]) -> int | None:
    """The score map's channel axis, where every node of ``tail`` computes each channel from
    that channel alone (so the tail can run on groups of channels); None otherwise.

    The map's path (values computed from its values) may hold elementwise ops whose other
    operands are scalar constants, Pad and Slice with constant pads and axes that leave the
    channels alone, and Resize by constant scales of 1 on the channels or by sizes computed
    from shapes (a constant would name the channel count). Shape leaves the path.
    """
    graph = tail.graph
    rank = next((len(v.type.tensor_type.shape.dim) for v in graph.input if v.name == score
                 and v.type.tensor_type.HasField("shape")), len(spatial) + 2)
    axis = next((a for a in range(1, rank) if a not in spatial), None)
    if axis is None:
        return None
    tensors = {t.name: t for t in graph.initializer}
    tensors.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute
                    if a.name == "value"})

    def size(name: str) -> int:
        return math.prod(tensors[name].dims)

    def const(name: str) -> np.ndarray | None:
        """A small constant operand (pads, axes, scales); a weight is never read."""
        t = tensors.get(name)
        if t is None or t.data_location == onnx.TensorProto.EXTERNAL or math.prod(t.dims) > 64:
            return None
        return onnx.numpy_helper.to_array(t)

    path = {score}
    for node in graph.node:
        data = [i for i in node.input if i in path]
        if not data:
            continue
        if node.domain not in ("", "ai.onnx"):
            return None
        op, ins = node.op_type, list(node.input) + [""] * 4
        if op == "Shape":
            continue  # the shape vector leaves the map's path
        if op in _ELEMENTWISE:
            if any(i and i not in path and (i not in tensors or size(i) != 1) for i in node.input):
                return None
        elif op == "Pad":
            pads = const(ins[1])
            if data != [ins[0]] or pads is None or ins[3] or pads.reshape(-1)[[0, axis, rank, rank + axis]].any():
                return None
        elif op == "Slice":
            axes = const(ins[3])
            if data != [ins[0]] or axes is None or any(int(a) % rank in (0, axis) for a in axes.reshape(-1)):
                return None
        elif op == "Resize":
            scales, sizes = const(ins[2]), ins[3]
            if data != [ins[0]] or (sizes and sizes in tensors):
                return None
            if not sizes and (scales is None or scales.reshape(-1)[[0, axis]].tolist() != [1.0, 1.0]):
                return None
        else:
            return None
        path.update(o for o in node.output if o)
    return axis


def run_in_channel_groups(run: Callable[[list[str], dict], Sequence[np.ndarray]], parts: Split,
                          feeds: Mapping[str, np.ndarray], bands: Bands, group: int,
                          allocate: Callable | None = None) -> dict[str, np.ndarray] | None:
    """The rebuilt outputs, computed ``group`` channels of the score map at a time (bands of
    kind ``channels``); None where a group's output does not have its channels (the caller
    runs the tail whole). ``allocate``: as for :func:`run_in_bands`."""
    score = feeds[bands.score]
    count = score.shape[bands.axis]
    out: dict[str, np.ndarray] = {}
    for c0 in range(0, count, group):
        c1 = min(count, c0 + group)
        index = [slice(None)] * score.ndim
        index[bands.axis] = slice(c0, c1)
        values = dict(zip(parts.rebuilt, run(parts.rebuilt, {**feeds, bands.score: np.ascontiguousarray(score[tuple(index)])})))
        for name in parts.rebuilt:
            value = values.pop(name)
            if value.ndim <= bands.axis or value.shape[bands.axis] != c1 - c0:
                return None
            if name not in out:
                shape = list(value.shape)
                shape[bands.axis] = count
                out[name] = allocate(name, shape, value.dtype) if allocate else np.empty(shape, value.dtype)
            dst = [slice(None)] * value.ndim
            dst[bands.axis] = slice(c0, c1)
            if out[name][tuple(dst)].shape != value.shape:
                return None
            out[name][tuple(dst)] = value
            windowed.release(out[name])
    return out


def band_rows(rows: int, est: int) -> int:
    """``rows`` rounded down to a multiple of ``est``, at least one ``est``."""
    return max(est, rows // est * est)


def run_in_bands(run: Callable[[list[str], dict], Sequence[np.ndarray]], parts: Split, feeds: Mapping[str, np.ndarray],
                 bands: Bands, rows: int, allocate: Callable | None = None) -> dict[str, np.ndarray] | None:
    """The rebuilt outputs, computed ``rows`` rows of the score map at a time (a multiple of
    its eST); ``run(names, feeds)`` runs the tail. None where a band's output came out shorter
    than the rows it must give (the caller runs the tail whole). ``allocate(name, shape,
    dtype)``: the output arrays (a file mapping, :class:`windowed.DiskOutputs`, whose pages
    each band gives back), else in memory."""
    score = feeds[bands.score]
    length = score.shape[bands.axis]
    cores = [(c0, min(c0 + rows, length)) for c0 in range(0, length, rows)]
    out: dict[str, np.ndarray] = {}
    total: dict[str, int] = {}
    for c0, c1 in reversed(cores):  # the last band first: it gives each output's length
        a = max(0, (c0 - HALO) // bands.est * bands.est)
        b = min(length, c1 + HALO)
        index = [slice(None)] * score.ndim
        index[bands.axis] = slice(a, b)
        band_feeds = {**feeds, bands.score: np.ascontiguousarray(score[tuple(index)])}
        values = dict(zip(parts.rebuilt, run(parts.rebuilt, band_feeds)))
        del band_feeds
        for name in parts.rebuilt:
            value, (axis, m, offset) = values.pop(name), bands.rows[name]
            if name not in out:
                feed = bands.sized.get(name)
                total[name] = int(feeds[feed[0]][feed[1]]) if feed else m * a + value.shape[axis]
                shape = list(value.shape)
                shape[axis] = total[name]
                out[name] = allocate(name, shape, value.dtype) if allocate else np.empty(shape, value.dtype)
            lo = 0 if c0 == 0 else min(total[name], math.ceil(c0 * m + offset))
            hi = total[name] if c1 == length else min(total[name], math.ceil(c1 * m + offset))
            if hi <= lo:
                continue
            if hi - m * a > value.shape[axis] or lo < m * a:
                return None
            src = [slice(None)] * value.ndim
            src[axis] = slice(lo - m * a, hi - m * a)
            dst = [slice(None)] * value.ndim
            dst[axis] = slice(lo, hi)
            target = out[name][tuple(dst)]
            if target.shape != value[tuple(src)].shape:
                return None
            target[...] = value[tuple(src)]
            del target
            windowed.release(out[name])
    return out


def split(proto: onnx.ModelProto, info: metadata.DenseInfo) -> Split:
    rebuilt = rebuilt_outputs(info)
    scores = list(dict.fromkeys(info.outputs[n].upsampling["score"] for n in rebuilt))
    graph = proto.graph
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output}  # indices: proto wrappers' ids change
    graph_inputs = {i.name for i in graph.input}
    inits = {t.name for t in graph.initializer}

    # The tail: every node between the score maps and the rebuilt outputs.
    tail_nodes, needed_inputs, needed_inits, seen = set(), [], set(), set()
    stack = list(rebuilt)
    while stack:
        name = stack.pop()
        if name in seen or name == "" or name in scores:
            continue
        seen.add(name)
        if name in inits:
            needed_inits.add(name)
            continue
        if name in graph_inputs:
            needed_inputs.append(name)
            continue
        index = producer[name]
        if index in tail_nodes:
            continue
        tail_nodes.add(index)
        node = graph.node[index]
        stack.extend(node.input)
        for attr in node.attribute:  # a subgraph's outer-scope names
            if attr.type == onnx.AttributeProto.GRAPH:
                stack.extend(_outer_names(attr.g))

    values = {v.name: v for v in [*graph.value_info, *graph.output, *graph.input]}
    needed = sorted(set(needed_inputs))
    shapes: dict[str, str] = {}
    for name in list(needed):
        readers = [i for i in tail_nodes if name in graph.node[i].input]
        if all(graph.node[i].op_type == "Shape" and not graph.node[i].attribute for i in readers):
            needed.remove(name)
            for i in readers:
                tail_nodes.discard(i)
                shapes[graph.node[i].output[0]] = name
    tail = onnx.helper.make_graph(
        [n for i, n in enumerate(graph.node) if i in tail_nodes],
        f"{graph.name}_final_upsampling",
        [values[s] for s in scores] + [values[i] for i in needed]
        + [onnx.helper.make_tensor_value_info(s, onnx.TensorProto.INT64, [None]) for s in shapes],
        [values[n] for n in rebuilt],
        [t for t in graph.initializer if t.name in needed_inits],
    )
    tail_model = onnx.helper.make_model(tail, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    channel_axes = {}
    for score in tail_model.graph.input[:len(scores)]:  # groups of channels feed fewer of them
        first = info.outputs[next(n for n in rebuilt if info.outputs[n].upsampling["score"] == score.name)]
        axes = tuple(int(a) for a in first.upsampling["score_axes"])
        axis = channel_axis(tail_model, score.name, axes)
        dims = score.type.tensor_type.shape.dim
        if axis is not None and axis < len(dims):
            dims[axis].Clear()
            dims[axis].dim_param = f"{score.name}_channels"
            channel_axes[score.name] = axis

    body = onnx.ModelProto()
    body.CopyFrom(proto)
    kept = [o for o in body.graph.output if o.name not in rebuilt]
    del body.graph.output[:]
    body.graph.output.extend(kept)
    live = _live_nodes(body.graph, {o.name for o in kept})
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for i, n in enumerate(body.graph.node) if i in live]
    del body.graph.node[:]
    body.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input} | {s for n in nodes for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
                                                     for s in _outer_names(a.g)}
    weights = [t for t in body.graph.initializer if t.name in used]
    del body.graph.initializer[:]
    body.graph.initializer.extend(weights)
    body_info = dataclasses.replace(info, outputs={k: v for k, v in info.outputs.items() if k not in rebuilt})
    for prop in body.metadata_props:
        if prop.key == metadata.KEY:
            prop.value = body_info.to_json()
    return Split(body, tail_model, scores + needed + list(shapes), rebuilt, shapes, channel_axes)


def _live_nodes(graph: onnx.GraphProto, outputs: set[str]) -> set[int]:
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output}
    live: set[int] = set()
    stack = list(outputs)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        index = producer[name]
        if index in live:
            continue
        live.add(index)
        node = graph.node[index]
        stack.extend(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                stack.extend(_outer_names(attr.g))
    return live


def _outer_names(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the scope around it."""
    local = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    names = set()
    for n in g.node:
        names.update(i for i in n.input if i and i not in local)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names.update(s for s in _outer_names(a.g) if s not in local)
    return names
