"""Rewrite, strategy "dilate" with ``--per-phase-global``: global context as per-phase means.

Under dilation, a dense tensor at eST e holds e (per axis) interleaved copies of the original
map: phase a = positions ``a + e*i``. A squeeze-and-excitation block averages the *original*
map and scales it; the exact dense form averages each phase's positions separately and scales
each position by the result of its own phase. Rules:

* A context global (GlobalAveragePool / GlobalMaxPool, ReduceMean / ReduceMax over every
  spatial axis with keepdims) reading a tensor at eST > 1 becomes, per spatial axis of size L:
  Pad the end to a multiple of e (zeros; the lowest finite value for max), Reshape each
  spatial axis L' into (L'/e, e), ReduceSum (ReduceMax) over the L'/e axes, and for the mean
  divide by the number of real positions of each phase (the same reduction over a padded map
  of ones). The result has the original's axes with e in place of each spatial size 1:
  (N, C, e_h, e_w), one mean per phase, for any input size (nothing is tied to the static size).
* The 1x1 Convs and activations of the block run on that (N, C, e_h, e_w) map unchanged.
* Where the block's result is broadcast back (the Mul of an SE block, any elementwise op whose
  other operand is the feature map), it is tiled: ``Tile`` by ceil(L/e) per spatial axis and
  sliced to the map's size, so position j gets phase ``j mod e``.
* Everything else is the usual dilation. Refused: the context reaching a Resize (an image
  pooling branch), a graph output or a Flatten (a Linear SE); other global reductions.

Exact: phase 0 (verify's subgrid) is the original. Phase a equals the phase of the
``fragments`` lowering (the original network whose first removed-stride node reads a map
shifted by a) wherever the dilated map has as many positions in every phase (every removed
stride divides the map); otherwise each phase averages the positions it has.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_dense import metadata
from onnx_dense.errors import UnsupportedNodeError
from onnx_dense.grid import GRID
from onnx_dense.passes import _ir
from onnx_dense.passes.plans import ANALYSIS, Analysis

PHASE_GLOBAL_OUTPUTS = "onnx_dense.phase_global_outputs"
_KINDS = {"GlobalAveragePool": "avg", "GlobalMaxPool": "max", "ReduceMean": "avg", "ReduceMax": "max"}
_NOT_ELEMENTWISE = ("Resize", "Upsample", "Flatten", "Reshape", "Squeeze", "Gemm", "MatMul")


def _is_context(value: ir.Value | None, names: set[str]) -> bool:
    if value is None:
        return False
    g = value.meta.get(GRID)
    return g is not None and bool(set(g.global_from) & names) and all(s == 1 for s in g.size)


class PerPhaseGlobalContext(ir.passes.InPlacePass):
    """Context globals at eST > 1 -> per-phase means; their broadcasts -> tiled per phase."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        analysis: Analysis = model.meta[ANALYSIS]
        opset = _ir.opset(model)
        editor = _ir.Editor(graph)
        targets = []
        for node in graph:
            if node.name not in analysis.context_globals:
                continue
            g = node.inputs[0].meta.get(GRID)
            if g is None or not g.is_dense:
                continue
            targets.append((node, g))
        names = {n.name for n, _ in targets}
        if not targets:
            model.meta[PHASE_GLOBAL_OUTPUTS] = set()
            return ir.passes.PassResult(model, False)
        broadcasts = []
        for node in graph:
            ins = [i for i, v in enumerate(node.inputs) if _is_context(v, names)]
            if not ins:
                continue
            out = node.outputs[0].meta.get(GRID) if node.outputs else None
            if out is not None and not all(s == 1 for s in out.size) and not out.inserted:
                ref = next((v for v in node.inputs if v is not None and v.meta.get(GRID) is not None
                            and v.meta[GRID].size == out.size), None)
                if node.op_type in _NOT_ELEMENTWISE or ref is None:
                    raise UnsupportedNodeError(
                        node, "brings per-phase global context back onto the map in a form --per-phase-global does not "
                        "rewrite (only elementwise ops such as the Mul of a squeeze-and-excitation block)",
                        "use --strategy fragments",
                    )
                broadcasts.append((node, ins, ref, out))
            elif node.op_type in ("Flatten", "Reshape", "Squeeze", "Gemm", "MatMul", "Resize", "Upsample"):
                raise UnsupportedNodeError(
                    node, f"{node.op_type} on global context at eST > 1 under --per-phase-global",
                    "use --strategy fragments",
                )
        for value in graph.outputs:
            if _is_context(value, names):
                raise UnsupportedNodeError(value.producer(), "its output is global context at eST > 1", "use --strategy fragments")
        model.meta[PHASE_GLOBAL_OUTPUTS] = _downstream_outputs(graph, [n for n, _ in targets])
        for node, g in targets:
            _phase_mean(graph, editor, node, g, opset)
        for node, ins, ref, out in broadcasts:
            for i in ins:
                _tile_back(graph, editor, node, i, ref, out)
        return ir.passes.PassResult(model, True)


def _phase_mean(graph: ir.Graph, editor: _ir.Editor, node: ir.Node, g, opset: int) -> None:
    kind = _KINDS.get(node.op_type)
    if kind is None:
        raise UnsupportedNodeError(
            node, f"{node.op_type} of global context has no per-phase form in onnx-dense (average and max only)",
            "use --strategy fragments",
        )
    if node.op_type.startswith("Reduce") and not node.attributes.get_int("keepdims", 1):
        raise UnsupportedNodeError(node, "global context reduced without keepdims", "use --strategy fragments")
    x = node.inputs[0]
    rank = x.shape.rank()
    axes = tuple(g.axes)
    est = dict(zip(axes, g.est))
    dtype = _ir.numpy_dtype(x)
    base = f"{node.name or node.op_type}_per_phase"
    nodes: list[ir.Node] = []
    E = np.array([est.get(a, 1) for a in range(rank)], dtype=np.int64)
    M = np.array([1 if a in est else 0 for a in range(rank)], dtype=np.int64)
    e_c = editor.const(nodes, E, base=f"{base}_est")
    shape = editor.op(nodes, "Shape", [x], base=f"{base}_shape")

    def split(t: ir.Value, t_shape: ir.Value, fill: float, name: str) -> ir.Value:
        rem = editor.op(nodes, "Mod", [t_shape, e_c], base=f"{name}_rem")
        short = editor.op(nodes, "Sub", [e_c, rem], base=f"{name}_short")
        pad_end = editor.op(nodes, "Mod", [short, e_c], base=f"{name}_pad_end")
        zeros = editor.const(nodes, np.zeros(rank, dtype=np.int64), base=f"{name}_pad_begin")
        pads = editor.op(nodes, "Concat", [zeros, pad_end], {"axis": 0}, base=f"{name}_pads")
        value = editor.const(nodes, np.array(fill, dtype=dtype), base=f"{name}_fill")
        padded = editor.op(nodes, "Pad", [t, pads, value], {"mode": "constant"}, base=f"{name}_pad")
        whole = editor.op(nodes, "Div", [editor.op(nodes, "Add", [t_shape, pad_end], base=f"{name}_len"), e_c],
                          base=f"{name}_steps")
        pieces = []
        for a in range(rank):
            pieces.append(_slice1(editor, nodes, whole, a, f"{name}_d{a}"))
            if a in est:
                pieces.append(editor.const(nodes, np.array([est[a]], dtype=np.int64), base=f"{name}_e{a}"))
        target = editor.op(nodes, "Concat", pieces, {"axis": 0}, base=f"{name}_split_shape")
        return editor.op(nodes, "Reshape", [padded, target], base=f"{name}_split")

    # axis a of x sits at position a + (number of spatial axes before a) of the split tensor
    steps_axes = [a + sum(1 for b in axes if b < a) for a in axes]
    lowest = float(np.finfo(dtype).min) if np.issubdtype(dtype, np.floating) else float(np.iinfo(dtype).min)
    if kind == "max":
        parts = split(x, shape, lowest, base)
        y = _reduce(editor, nodes, "ReduceMax", parts, steps_axes, opset, f"{base}_max")
    else:
        parts = split(x, shape, 0.0, base)
        total = _reduce(editor, nodes, "ReduceSum", parts, steps_axes, opset, f"{base}_sum")
        m_c = editor.const(nodes, M, base=f"{base}_spatial_mask")
        one_c = editor.const(nodes, 1 - M, base=f"{base}_other_mask")
        ones_shape = editor.op(nodes, "Add", [editor.op(nodes, "Mul", [shape, m_c], base=f"{base}_ones_dims"), one_c],
                               base=f"{base}_ones_shape")
        ones = editor.op(
            nodes, "ConstantOfShape", [ones_shape], {"value": ir.tensor(np.array([1], dtype=dtype), name=f"{base}_1")},
            base=f"{base}_ones",
        )
        count_parts = split(ones, ones_shape, 0.0, f"{base}_count")
        count = _reduce(editor, nodes, "ReduceSum", count_parts, steps_axes, opset, f"{base}_count")
        y = editor.op(nodes, "Div", [total, count], base=f"{base}_mean")
    graph.insert_before(node, nodes)
    _ir.replace_value(node.outputs[0], y)
    graph.remove(node, safe=True)


def _tile_back(graph: ir.Graph, editor: _ir.Editor, node: ir.Node, index: int, ref: ir.Value, out) -> None:
    """Operand ``index`` of ``node`` (N, C, e_h, e_w) -> (N, C, L_h, L_w), position j gets phase j mod e."""
    c = node.inputs[index]
    rank = ref.shape.rank() if ref.shape is not None else None
    if rank is None or c.shape is None or c.shape.rank() != rank:
        raise UnsupportedNodeError(node, "broadcasts global context of another rank", "use --strategy fragments")
    axes = tuple(out.axes)
    est = dict(zip(axes, out.est))
    E = np.array([est.get(a, 1) for a in range(rank)], dtype=np.int64)
    M = np.array([1 if a in est else 0 for a in range(rank)], dtype=np.int64)
    base = f"{node.name or node.op_type}_per_phase_tile"
    nodes: list[ir.Node] = []
    shape = editor.op(nodes, "Shape", [ref], base=f"{base}_shape")
    up = editor.op(nodes, "Add", [shape, editor.const(nodes, E - 1, base=f"{base}_em1")], base=f"{base}_up")
    ceil = editor.op(nodes, "Div", [up, editor.const(nodes, E, base=f"{base}_est")], base=f"{base}_ceil")
    reps = editor.op(
        nodes, "Add",
        [editor.op(nodes, "Mul", [ceil, editor.const(nodes, M, base=f"{base}_mask")], base=f"{base}_spatial_reps"),
         editor.const(nodes, 1 - M, base=f"{base}_other")],
        base=f"{base}_reps",
    )
    tiled = editor.op(nodes, "Tile", [c, reps], base=base)
    idx = editor.const(nodes, np.array(axes, dtype=np.int64), base=f"{base}_axes")
    ends = editor.op(nodes, "Gather", [shape, idx], {"axis": 0}, base=f"{base}_ends")
    starts = editor.const(nodes, np.zeros(len(axes), dtype=np.int64), base=f"{base}_starts")
    cropped = editor.op(nodes, "Slice", [tiled, starts, ends, idx], base=f"{base}_crop")
    graph.insert_before(node, nodes)
    node.replace_input_with(index, cropped)


def _slice1(editor, nodes, vec: ir.Value, a: int, base: str) -> ir.Value:
    s = editor.const(nodes, np.array([a], dtype=np.int64), base=f"{base}_from")
    e = editor.const(nodes, np.array([a + 1], dtype=np.int64), base=f"{base}_to")
    return editor.op(nodes, "Slice", [vec, s, e], base=base)


def _reduce(editor, nodes, op: str, x: ir.Value, axes, opset: int, base: str) -> ir.Value:
    """ReduceSum/ReduceMax over ``axes`` without keepdims, in the form the opset takes."""
    as_input = opset >= (13 if op == "ReduceSum" else 18)
    if as_input:
        a = editor.const(nodes, np.array(axes, dtype=np.int64), base=f"{base}_axes")
        return editor.op(nodes, op, [x, a], {"keepdims": 0}, base=base)
    return editor.op(nodes, op, [x], {"axes": list(axes), "keepdims": 0}, base=base)


def _downstream_outputs(graph: ir.Graph, starts) -> set[str]:
    reached: set[ir.Value] = set()
    for node in starts:
        reached.update(node.outputs)
    for node in graph:
        if any(v in reached for v in node.inputs if v is not None):
            reached.update(node.outputs)
    return {v.name for v in graph.outputs if v in reached}


class MarkPerPhaseGlobal(ir.passes.InPlacePass):
    """Metadata: per_phase_global, and off_grid "global" for outputs downstream of it."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import dataclasses

        reached = model.meta.get(PHASE_GLOBAL_OUTPUTS)
        info = metadata.read(model)
        if info is None or reached is None:
            return ir.passes.PassResult(model, False)
        outputs = {
            k: dataclasses.replace(v, off_grid="global") if k in reached else v for k, v in info.outputs.items()
        }
        info = dataclasses.replace(info, outputs=outputs, per_phase_global=True)
        model.metadata_props[metadata.KEY] = info.to_json()
        return ir.passes.PassResult(model, True)
