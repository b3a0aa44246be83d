"""Normalise: Resize sizes baked in at export, re-derived from the graph (``--rederive-sizes``).

An exporter that traces a model at one size may write a Resize's output size as numbers: the
dynamo exporter as a constant ``sizes``, the TorchScript one as
``Concat(Shape(x)[0:2], [h, w])``. Such an original (and its dense model) runs only at that
size. Rules, for each default-domain Resize with ``sizes`` (no ``axes`` attribute):

* Baked axes: the entries of ``sizes`` that are constants (all of them for a constant,
  the constant operands of a Concat) and differ from the input's static size there.
* The size is derivable when a tensor of the same rank has exactly those sizes on the baked
  axes: first another operand of a node that joins the Resize's output, or a tensor computed
  from it at that size (Concat, Add, Mul, Sub, Div, Sum, Max, Min: the image-pooling branch's
  partner, LR-ASPP's skip past its 1x1 classifier), past Transposes too, the axes followed
  through them (tf2onnx joins in NHWC what it resized in NCHW), never one computed from the
  Resize's own output (a cycle), else a graph input (an
  upsampling back to the image size), else the one tensor computed before the Resize that
  has them (none when there are several: not guessed).
* With ``rederive`` on, a derivable size is replaced by
  ``Concat(Slice(Shape(src_i), a_i, a_i + 1) for each axis i)``: on a baked axis the tensor
  found and ``a_i`` the axis ``i`` is there, elsewhere the Resize's input and ``i``. Otherwise nothing changes.
* Every baked Resize leaves one line in ``model.meta[SIZE_NOTES]`` for rewrite's summary:
  what was re-derived, what could be, or that no tensor has that size.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_dense.passes import _ir

SIZE_NOTES = "onnx_dense.size_notes"  # model.meta: lines for rewrite's summary
# model.meta: the baked sizes left as they are, for the dense model's metadata (a run at another
# size then says why it fails: DenseInfo.fixed_sizes)
SIZE_LIMITS = "onnx_dense.size_limits"

_JOINS = ("Concat", "Add", "Mul", "Sub", "Div", "Sum", "Max", "Min")


class RederiveSizes(ir.passes.InPlacePass):
    def __init__(self, rederive: bool = False) -> None:
        super().__init__()
        self.rederive = rederive

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        notes: list[str] = model.meta.setdefault(SIZE_NOTES, [])
        limits: list[str] = model.meta.setdefault(SIZE_LIMITS, [])
        modified = False
        seen: list[ir.Value] = [v for v in graph.inputs if v.name not in graph.initializers]
        for node in list(graph):
            if node.op_type == "Resize" and node.domain in ("", "ai.onnx"):
                modified |= self._resize(graph, node, seen, notes, limits,
                                         [v for v in graph.inputs if v.name not in graph.initializers])
            seen.extend(node.outputs)
        if modified:
            graph.sort()  # a source computed after the Resize (past its classifier) comes first now
        return ir.passes.PassResult(model, modified)

    def _resize(self, graph, node: ir.Node, seen, notes, limits, inputs) -> bool:
        if len(node.inputs) < 4 or node.inputs[3] is None or "axes" in node.attributes:
            return False
        x = node.inputs[0]
        in_dims = _ir.static_dims(x)
        baked = _baked_entries(node.inputs[3])
        if in_dims is None or baked is None or len(baked) != len(in_dims):
            return False
        axes = [i for i, b in enumerate(baked) if b is not None and b != in_dims[i]]
        if not axes:
            return False
        want = {i: baked[i] for i in axes}
        label = f"Resize '{node.name or '<unnamed>'}'"
        size = "x".join(str(want[i]) for i in axes)
        src, where = _source(node, want, len(in_dims), seen, inputs)
        if src is None:
            notes.append(
                f"{label} resizes to {size}, a size baked in at export that no tensor of the graph has to derive it "
                "from: the original and the dense model run only at the export size"
            )
            limits.append(f"{label} resizes to {size}, a size baked in at export that no tensor has to derive it from")
            return False
        if not self.rederive:
            notes.append(
                f"{label} resizes to {size}, a size baked in at export: the original and the dense model run only at "
                f"the export size; --rederive-sizes takes it from '{src.name}' at run time"
            )
            limits.append(f"{label} resizes to {size}, a size baked in at export; rewrite with --rederive-sizes to "
                          f"take it from '{src.name}' at run time")
            return False
        editor = _ir.Editor(graph)
        nodes: list[ir.Node] = []
        base = f"{node.name or 'Resize'}_sizes"
        shapes = {id(x): editor.op(nodes, "Shape", [x], base=f"{base}_in")}
        shapes[id(src)] = editor.op(nodes, "Shape", [src], base=f"{base}_from")
        parts = []
        for i in range(len(in_dims)):
            a = where[i] if i in want else i
            start = editor.const(nodes, np.array([a], dtype=np.int64), base=f"{base}_at{i}")
            end = editor.const(nodes, np.array([a + 1], dtype=np.int64), base=f"{base}_to{i}")
            shape = shapes[id(src)] if i in want else shapes[id(x)]
            parts.append(editor.op(nodes, "Slice", [shape, start, end], base=f"{base}_{i}"))
        sizes = editor.op(nodes, "Concat", parts, {"axis": 0}, base=base)
        graph.insert_before(node, nodes)
        node.replace_input_with(3, sizes)
        notes.append(f"{label}: its size {size}, baked in at export, re-derived from the size of '{src.name}'")
        return True


def _baked_entries(sizes: ir.Value) -> list[int | None] | None:
    """Per entry of ``sizes``: the constant it holds, or None where it is computed."""
    array = _ir.const_array(sizes)
    if array is not None:
        return [int(v) for v in array.reshape(-1)]
    producer = sizes.producer()
    if producer is None or producer.op_type != "Concat" or producer.domain not in ("", "ai.onnx"):
        return None
    entries: list[int | None] = []
    for v in producer.inputs:
        if v is None:
            return None
        part = _ir.const_array(v)
        if part is not None:
            entries.extend(int(e) for e in part.reshape(-1))
            continue
        dims = _ir.static_dims(v)
        if dims is None or len(dims) != 1 or dims[0] is None:
            return None
        entries.extend([None] * dims[0])
    return entries


def _matches(value: ir.Value, want: dict[int, int], rank: int, where: dict[int, int] | None = None) -> bool:
    """``value`` has size ``want[i]`` on axis ``where[i]`` (default ``i``) of its ``rank`` axes."""
    dims = _ir.static_dims(value)
    where = where or {i: i for i in want}
    return dims is not None and len(dims) == rank and all(dims[where[i]] == s for i, s in want.items())


def _source(node: ir.Node, want: dict[int, int], rank: int, seen, inputs) -> tuple[ir.Value | None, dict[int, int]]:
    """The tensor to take the size from, and where each baked axis of the Resize is on it."""
    out = node.outputs[0]
    after = _downstream(out)
    same = {i: i for i in want}
    # The join the resized map meets, past ops that keep its size (LR-ASPP's 1x1 classifier
    # before the Add with the skip's) and Transposes: its other operand, unless it is computed
    # from the map.
    frontier, visited = [(out, same)], set()
    while frontier:
        value, where = frontier.pop(0)
        for user, _ in value.uses():
            if id(user) in visited:
                continue
            visited.add(id(user))
            if user.domain not in ("", "ai.onnx"):
                continue
            if user.op_type in _JOINS:
                for v in user.inputs:
                    if (v is not None and id(v) not in after and not v.is_initializer()
                            and _matches(v, want, rank, where)):
                        return v, where
            moved = where
            if user.op_type == "Transpose":
                perm = user.attributes.get_ints("perm", None)
                if perm is None or len(perm) != rank:
                    continue
                moved = {i: list(perm).index(a) for i, a in where.items()}
            frontier.extend((o, moved) for o in user.outputs if _matches(o, want, rank, moved))
    for v in inputs:
        if _matches(v, want, rank):
            return v, same
    found = [v for v in seen if v is not node.inputs[0] and _matches(v, want, rank) and not v.is_initializer()]
    return (found[0], same) if len(found) == 1 else (None, same)


def _downstream(value: ir.Value) -> set[int]:
    """ids of ``value`` and of every value computed from it."""
    done = {id(value)}
    stack = [value]
    while stack:
        for user, _ in stack.pop().uses():
            for o in user.outputs:
                if id(o) not in done:
                    done.add(id(o))
                    stack.append(o)
    return done
