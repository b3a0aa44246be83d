"""Final upsampling: the block that takes a segmentation head's score map back to the input size.

Reads the grids of ``AnalyseGrid(None)`` (passes/analyse.py), changes nothing. The final block
of an output is what lies between the output and the last tensor T on its path whose
information stride equals its grid stride (grid.py: an upsampled map is finer than its
predictions). It is *fixed* (:class:`FinalUpsampling`, rebuilt by
passes/final_upsampling.py) when it is, in any order after the upsampling:

* one upsampling by an integer factor s per spatial axis: a Resize in mode linear, nearest or cubic
  with coordinate_transformation_mode half_pixel, pytorch_half_pixel, half_pixel_symmetric,
  asymmetric, align_corners or tf_half_pixel_for_nn (TensorFlow's nearest), or a
  ConvTranspose whose weight is the bilinear kernel of its stride per channel (FCN's, with
  group C or a diagonal weight; any bias per channel);
* crops: Slice on spatial axes with constant starts and step 1;
* per-position ops: unary activations, Cast, Softmax/LogSoftmax/ArgMax over a non-spatial axis,
  Transpose (TensorFlow's exports upsample NCHW and transpose back to NHWC), Squeeze and
  Unsqueeze of non-spatial axes (a one-channel mask as N x H x W).

Every such block reads T at output pixel y at T coordinate x = (y - offset) / s (in T
positions), linearly (zero beyond the ends for a ConvTranspose, clamped for a Resize) or by
nearest rounding; align_corners reads x = y (h - 1) / (H - 1). The output's length at any input
size is the original's: the input's (``sized_by``: a Resize whose ``sizes`` are the input's
size, as ``F.interpolate(size=x.shape[-2:])`` exports), else s times T's plus what it was at
the static size (a Resize by scales, a ConvTranspose, crops). Anything else in the block (a
learned ConvTranspose, a Conv after the upsampling, a U-Net's last decoder block) makes it
*learned*: ``problem`` says which node, and only the score map T itself can be made dense
(``--no-final-upsampling``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnx_dense.errors import node_label
from onnx_dense.grid import GRID, Grid, fmt
from onnx_dense.passes import _ir

TAIL_UNARY = {"Identity", "Sigmoid", "Relu", "Tanh", "Exp", "HardSigmoid", "Cast", "Softplus", "Clip"}
TAIL_AXIS = {"Softmax", "LogSoftmax", "ArgMax"}
RESIZE_MODES = {"half_pixel", "pytorch_half_pixel", "half_pixel_symmetric", "asymmetric", "align_corners",
                "tf_half_pixel_for_nn"}


@dataclasses.dataclass(frozen=True)
class FinalUpsampling:
    """The final block of one output (module docstring). Sizes are static, spatial axes in order."""

    output: str
    score: str  # T: the tensor the block reads
    node: str  # the upsampling node, as messages name it ("'up' (Resize)")
    nodes: tuple[str, ...]  # every node of the block, upsampling first
    axes: tuple[int, ...]  # spatial axes of T
    out_axes: tuple[int, ...]  # spatial axes of the output (ArgMax with keepdims=0 moves them)
    score_stride: tuple[int, ...]  # T's grid stride (= its information stride)
    out_stride: tuple[int, ...]  # the output's grid stride
    score_size: tuple[int, ...]
    out_size: tuple[int, ...]
    problem: str | None = None  # learned: why the block cannot be rebuilt (names the node)
    kind: str = "resize"  # "resize" or "transpose" (fixed bilinear ConvTranspose)
    mode: str = "linear"  # "linear", "nearest" or "cubic"
    cubic_a: float = -0.75  # cubic: the Resize's cubic_coeff_a
    nearest_mode: str = "round_prefer_floor"
    align_corners: bool = False
    factor: tuple[int, ...] = ()  # s: output positions per T position
    offset: tuple[float, ...] = ()  # output pixel at which T position 0 sits
    odd_kernel: tuple[bool, ...] = ()  # transpose: kernel 2s-1 (centre on a pixel) rather than 2s
    bias: tuple[float, ...] | None = None  # transpose: per channel
    tail: tuple[ir.Node, ...] = ()  # per-position ops after the upsampling, in order
    sized_by: tuple[int, ...] | None = None  # the input's axes whose size the output has; None: s times T's
    # Per tail op, read while the graph is whole (the cut removes the Constants they read): what
    # verify's reference applies, and the constant inputs after the first (Clip's bounds, axes).
    tail_records: tuple[dict, ...] = ()
    tail_args: tuple[tuple, ...] = ()

    @property
    def size_offset(self) -> tuple[int, ...]:
        """Output length minus s times T's, at the static size (a relative output keeps it)."""
        return tuple(o - f * t for o, f, t in zip(self.out_size, self.factor, self.score_size))

    @property
    def fixed(self) -> bool:
        return self.problem is None

    def description(self, est: tuple[int, ...]) -> dict:
        """What the dense model's metadata records (verify recomputes the output from it)."""
        m = [s // e for s, e in zip(self.factor, est)]
        return {
            "score": self.score, "score_axes": list(self.axes), "kind": self.kind, "mode": self.mode, "nearest_mode": self.nearest_mode,
            "align_corners": self.align_corners, "factor": m, "offset": list(self.offset), "cubic_a": self.cubic_a,
            "score_est": list(est), "score_size": list(self.score_size), "bias": list(self.bias) if self.bias else None,
            "tail": list(self.tail_records), "replaces": list(self.nodes),
            "sized_by": list(self.sized_by) if self.sized_by is not None else None,
        }


def _squeeze_axes(node: ir.Node) -> list[int] | None:
    """The axes a Squeeze takes (of its input) or an Unsqueeze inserts (of its output),
    normalised; None where they are not constant or the ranks are not known."""
    if "axes" in node.attributes:
        axes = list(node.attributes.get_ints("axes"))
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        array = _ir.const_array(node.inputs[1])
        if array is None:
            return None
        axes = [int(a) for a in np.atleast_1d(array)]
    elif node.op_type == "Squeeze" and node.inputs[0] is not None:
        dims = _ir.static_dims(node.inputs[0])
        if dims is None or None in dims:
            return None
        axes = [a for a, d in enumerate(dims) if d == 1]
    else:
        return None
    out = node.outputs[0].shape
    if out is None:
        return None
    rank = out.rank() + (len(axes) if node.op_type == "Squeeze" else 0)
    return [_ir.normalise_axis(a, rank) for a in axes]


def tail_record(node: ir.Node) -> dict:
    attrs = {}
    if node.op_type in ("Squeeze", "Unsqueeze"):
        attrs["axes"] = _squeeze_axes(node)
    for name in ("axis", "keepdims", "select_last_index", "to", "alpha", "beta", "perm"):
        a = node.attributes.get(name)
        if a is not None:
            attrs[name] = a.value
    if node.op_type == "Clip":
        bounds = [_ir.const_array(v) if v is not None else None for v in node.inputs[1:3]]
        attrs["bounds"] = [None if b is None else float(b) for b in bounds] + [None] * (2 - len(bounds))
    return {"op": node.op_type, "attrs": attrs}


def final_blocks(model: ir.Model) -> dict[str, FinalUpsampling]:
    """Per graph output ending in an upsampled map, its final block (read from the grids of
    ``AnalyseGrid(None)``, which the caller has run)."""
    found = {}
    for value in model.graph.outputs:
        g = value.meta.get(GRID)
        if g is None or g.axes is None or g.info is None:
            continue
        block = _final_block(model, value, g)
        if block is not None:
            found[value.name] = block
    return found


def _image_inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.meta.get(GRID) is not None]


def _final_block(model: ir.Model, output: ir.Value, og: Grid) -> FinalUpsampling | None:
    chain: list[ir.Node] = []
    value = output
    while True:
        g: Grid = value.meta.get(GRID)
        if g is None or g.axes is None:
            return None
        if g.info is None:
            break
        node = value.producer()
        if node is None:
            return None
        inputs = _image_inputs(node)
        if len(inputs) != 1:
            return None  # joins of two upsampled maps: no single score map
        chain.append(node)
        value = inputs[0]
    chain.reverse()
    score, sg = value, value.meta[GRID]
    if not chain or sg.rank != og.rank:
        return None
    base = dict(
        output=output.name, score=score.name, nodes=tuple(n.name or n.op_type for n in chain), axes=tuple(sg.axes),
        out_axes=tuple(og.axes),
        score_stride=tuple(sg.stride), out_stride=tuple(og.stride), score_size=tuple(sg.size), out_size=tuple(og.size),
    )
    for n in chain[:-1]:  # T itself may be read elsewhere: the dense region keeps it
        v = n.outputs[0]
        if len(v.uses()) != 1 or v.is_graph_output():
            return FinalUpsampling(
                node=node_label(n), problem=f"the final upsampling block of output '{output.name}' has tensor "
                f"'{v.name}', which is read outside it, so it has no dense form at a finer stride", **base,
            )
    up, rest = chain[0], chain[1:]
    label = node_label(up)
    learned = None
    crop = [0] * sg.rank
    tail = []
    if up.op_type == "Resize":
        fields = _resize(up, sg, og)
    elif up.op_type == "ConvTranspose":
        fields = _transpose(up, sg, og)
    else:
        fields = f"is a {up.op_type}, not a fixed interpolation"
    if isinstance(fields, str):
        learned = (up, fields)
    where = list(sg.axes)  # T's spatial axes in the tensor so far (a Transpose moves them)
    for n in rest if learned is None else ():
        rank = n.inputs[0].shape.rank() if n.inputs[0].shape is not None else None
        if n.op_type == "Slice":
            why = _crop(n, where, crop)
            if why:
                learned = (n, why)
                break
        elif n.op_type in TAIL_UNARY:
            tail.append(n)
        elif n.op_type == "Transpose" and rank is not None:  # back to NHWC, as TensorFlow's exports end
            perm = list(n.attributes.get_ints("perm", list(range(rank))[::-1]))
            where = [perm.index(a) for a in where]
            tail.append(n)
        elif n.op_type in ("Squeeze", "Unsqueeze") and rank is not None:  # a channel axis of 1 taken or given
            axes = _squeeze_axes(n)
            if axes is None or (n.op_type == "Squeeze" and any(a in where for a in axes)):
                learned = (n, "squeezes a spatial axis" if axes is not None else "squeezes axes that are not constant")
                break
            for a in sorted(axes, reverse=n.op_type == "Squeeze"):
                where = [w - (w > a) for w in where] if n.op_type == "Squeeze" else [w + (w >= a) for w in where]
            tail.append(n)
        elif n.op_type in TAIL_AXIS:
            default = 0 if n.op_type == "ArgMax" else (-1 if _ir.opset(model) >= 13 else 1)
            axis = n.attributes.get_int("axis", default)
            if rank is None or _ir.normalise_axis(axis, rank) in where or (
                n.op_type != "ArgMax" and _ir.opset(model) < 13
            ):
                learned = (n, "runs over a spatial axis")
                break
            if n.op_type == "ArgMax" and not n.attributes.get_int("keepdims", 1):
                axis = _ir.normalise_axis(axis, rank)
                where = [a - (a > axis) for a in where]
            tail.append(n)
        else:
            kind = "has learned weights" if any(v is not None and v.const_value is not None and v.shape is not None
                                                 and v.shape.rank() and v.shape.rank() > 1 for v in n.inputs[1:]) \
                else "is neither an interpolation nor a per-position op"
            learned = (n, f"{kind} after the upsampling")
            break
    if learned is not None:
        node, why = learned
        problem = (
            f"the final upsampling block from '{score.name}' (predictions every {fmt(sg.stride)} px) to output "
            f"'{output.name}' has node {node_label(node)}, which {why}, so it has no dense form at a finer stride"
        )
        return FinalUpsampling(node=label, problem=problem, **base)
    factor = fields.pop("factor")
    if any(f * os != ss for f, os, ss in zip(factor, og.stride, sg.stride)):
        return FinalUpsampling(node=label, problem=f"node {label} scales by {fmt(factor)}, not the grid's ratio", **base)
    offset = tuple(o - c for o, c in zip(fields.pop("offset"), crop))
    args = tuple(tuple(_ir.const_array(v) if v is not None else None for v in n.inputs[1:]) for n in tail)
    return FinalUpsampling(node=label, factor=tuple(factor), offset=offset, tail=tuple(tail),
                           sized_by=_sized_by_input(model, up, og), tail_records=tuple(tail_record(n) for n in tail),
                           tail_args=args, **fields, **base)


def _sized_by_input(model: ir.Model, up: ir.Node, og: Grid) -> tuple[int, ...] | None:
    """The input axes a Resize given ``sizes`` takes the output to, where the output has the
    input's size (folded from ``Shape(x)``, or baked at export): at another input size the
    original's output is that input's size. A Resize by scales: None."""
    if up.op_type != "Resize" or len(up.inputs) < 4 or up.inputs[3] is None:
        return None
    sizes = _ir.const_array(up.inputs[3])
    if sizes is not None and sizes.size == 0:
        return None
    source = next((v for v in model.graph.inputs if v.name == og.source), None)
    dims = _ir.static_dims(source) if source is not None else None
    if dims is None or og.source_axes is None or len(og.source_axes) != len(og.size):
        return None
    if tuple(dims[a] for a in og.source_axes) != tuple(og.size):
        return None
    return tuple(og.source_axes)


def _crop(node: ir.Node, where: list[int], crop: list[int]) -> str | None:
    starts, ends = (_ir.const_array(v) for v in node.inputs[1:3])
    axes = _ir.const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = _ir.const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
    if starts is None or ends is None or rank is None:
        return "is a crop whose bounds are not constant"
    axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
    if steps is not None and any(int(s) != 1 for s in steps):
        return "is a strided Slice"
    dims = _ir.static_dims(node.inputs[0])
    for a, s in zip(axes, starts):
        a = _ir.normalise_axis(a, rank)
        s = int(s)
        if a not in where:
            if s != 0:
                return "slices a non-spatial axis"
            continue
        if s < 0:
            if dims is None or dims[a] is None:
                return "is a crop counted from the end"
            s += int(dims[a])
        crop[where.index(a)] += s
    return None


def _resize(node: ir.Node, sg: Grid, og: Grid):
    attrs = node.attributes
    mode = attrs.get_string("mode", "nearest")
    coord = attrs.get_string("coordinate_transformation_mode", "half_pixel")
    if mode not in ("linear", "nearest", "cubic"):
        return f"interpolates in mode {mode} (onnx-dense rebuilds linear, nearest and cubic)"
    if mode == "cubic" and attrs.get_int("exclude_outside", 0):
        return "is a cubic Resize with exclude_outside (onnx-dense rebuilds it without)"
    if coord not in RESIZE_MODES:
        return f"uses coordinate_transformation_mode {coord}"
    if attrs.get_string("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "keeps the aspect ratio"
    ind = _ir.static_dims(node.inputs[0])
    outd = _ir.static_dims(node.outputs[0])
    if ind is None or outd is None or None in ind or None in outd:
        return "has no static sizes"
    for a in range(len(ind)):
        if a not in sg.axes and ind[a] != outd[a]:
            return "resizes a non-spatial axis"
    factor, offset = [], []
    for a in sg.axes:
        h, H = int(ind[a]), int(outd[a])
        if H % h:
            return f"scales {h} to {H}, not by an integer factor"
        s = H // h
        factor.append(s)
        # x = (y + 0.5) / s - 0.5 (half pixel), y / s, or (y + 0.5) / s (TensorFlow's nearest)
        offset.append(0.0 if coord in ("asymmetric", "align_corners") else -0.5 if coord == "tf_half_pixel_for_nn"
                      else (s - 1) / 2)
    return dict(
        kind="resize", mode=mode, nearest_mode=attrs.get_string("nearest_mode", "round_prefer_floor"),
        align_corners=coord == "align_corners", factor=factor, offset=offset, odd_kernel=(False,) * len(factor),
        cubic_a=attrs.get_float("cubic_coeff_a", -0.75),
    )


def bilinear_kernel(size: int, factor: int) -> np.ndarray:
    """1-D bilinear upsampling kernel of ``size`` taps for ``factor`` (FCN's initialisation)."""
    centre = (size - 1) / 2
    return np.maximum(0.0, 1 - np.abs(np.arange(size) - centre) / factor)


def bilinear_weight_problem(weight: np.ndarray, strides, group: int) -> str | None:
    """Why a ConvTranspose weight is not a fixed bilinear upsampling by ``strides`` (one
    bilinear kernel per channel, as FCN initialises and freezes it), or None when it is."""
    kernel = weight.shape[2:]
    cin = weight.shape[0]
    expected = 1.0
    for k, s in zip(kernel, strides):
        if k not in (2 * s, 2 * s - 1):
            return f"is a learned ConvTranspose (kernel {fmt(kernel)} at stride {fmt(strides)}, not bilinear)"
        expected = np.multiply.outer(expected, bilinear_kernel(k, s))
    w = weight.astype(np.float64)
    if group == cin and w.shape[1] == 1:
        per = w[:, 0]
    elif group == 1 and w.shape[0] == w.shape[1]:
        eye = np.eye(cin, dtype=bool)
        if np.abs(w[~eye]).max(initial=0.0) > 0:
            return "is a learned ConvTranspose (it mixes channels)"
        per = w[eye]
    else:
        return "is a learned ConvTranspose (its weight is not one kernel per channel)"
    if not np.allclose(per, np.broadcast_to(expected, per.shape), rtol=1e-5, atol=1e-6):
        return "is a learned ConvTranspose (its weight is not the bilinear kernel of its stride)"
    return None


def _transpose(node: ir.Node, sg: Grid, og: Grid):
    params = _ir.window_params(node)
    weight = _ir.const_array(node.inputs[1])
    if weight is None:
        return "is a ConvTranspose whose weight is computed"
    if any(d != 1 for d in params.dilations) or node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", ""):
        return "is a dilated or auto-padded ConvTranspose"
    problem = bilinear_weight_problem(weight, params.strides, node.attributes.get_int("group", 1))
    if problem is not None:
        return problem
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = _ir.const_array(node.inputs[2])
        if b is None:
            return "is a ConvTranspose whose bias is computed"
        bias = tuple(float(v) for v in b.reshape(-1))
    offset = [(k - 1) / 2 - pb for k, pb in zip(params.kernel, params.pads_begin)]
    return dict(
        kind="transpose", mode="linear", factor=list(params.strides), offset=offset,
        odd_kernel=tuple(k % 2 == 1 for k in params.kernel), bias=bias,
    )
