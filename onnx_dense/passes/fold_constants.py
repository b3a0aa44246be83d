"""Normalise: shape arithmetic that exporters leave in the graph becomes constants.

The TorchScript exporter computes pads, targets and branch conditions at run time from
constants and from ``Shape`` (its ``LocalResponseNorm`` is the usual example). The analysis
must read those numbers, so this pass computes them. Rules:

* A default-domain node whose inputs are all constant and hold no floating-point
  initializer (shape arithmetic, not weights) is replaced by a Constant of its result.
  Weights are never folded: they must keep their names for dpoa export.
* An ``If`` whose condition follows from constants and from static dims read through
  ``Shape`` (``Gather``/``Slice`` of it) is replaced by the branch it takes at the static size.
  The dims it read are recorded in ``model.meta[ASSUMED_DIMS]``; the analysis refuses the
  model if any of them is a spatial dim of a dense tensor (the dense size differs there).
* ``Pad`` pads, ``Slice`` bounds and ``Split`` sizes computed from constants and static dims
  read through ``Shape`` (timm's TF-style SAME padding, torch's ``chunk``) become constants
  at the static size. A Pad's amount at the static size is what ``auto_pad=SAME`` becomes
  (passes/explicit_padding.py); the dims a Slice or Split read are recorded like an If's
  (a split of channels is fine; a spatial size of a dense tensor is refused). So does a
  ``Reshape`` target that reads only batch sizes where ONNX's data propagation could not
  follow it (paddle2onnx's flatten through a Cast), leaving the output shape unknown;
  passes/densify_reshapes.py takes a baked batch from the running tensor.
* Nothing else changes. ``Shape`` of an image tensor is not folded: that would bake the
  traced size into the dense model, which must run at any size.

onnxscript's constant folder does more (it folds ``Shape`` of any static tensor, which is
exactly what must not happen here) and is not a runtime dependency, so this small pass
evaluates nodes with onnx's reference evaluator instead.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from onnx_dense.passes import _ir

ASSUMED_DIMS = "onnx_dense.assumed_dims"  # model.meta: list of (value, dims, node label)

_MAX_BYTES = 1 << 20
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
# Operands that must be known to the analysis, computed from static dims where they are not
# constant: Pad's pads and axes, Slice's starts/ends/axes/steps, Split's sizes, and Reshape
# targets that read nothing but batch sizes where shape inference could not follow them
# (paddle2onnx's flatten: Shape, Gather, Cast, Concat).
_STATIC_OPERANDS = {"Pad": (1, 3), "Slice": (1, 2, 3, 4), "Split": (1,), "Reshape": (1,)}
_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}


class FoldShapeArithmetic(ir.passes.InPlacePass):
    """Constant shape arithmetic -> Constant nodes; statically decided If -> its branch."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.opset = _ir.opset(model)
        assumed = model.meta.setdefault(ASSUMED_DIMS, [])
        modified = False
        for node in list(graph):
            if node.graph is not graph or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "If":
                modified |= self._inline_if(graph, node, assumed)
            elif node.op_type in _STATIC_OPERANDS and self._fold_operands(graph, node, assumed):
                modified = True
            elif self._foldable(node):
                values = _evaluate(node, [_ir.const_array(v) for v in node.inputs], self.opset)
                if values is not None:
                    _replace_with_constants(graph, node, values)
                    modified = True
        return ir.passes.PassResult(model, modified)

    def _foldable(self, node: ir.Node) -> bool:
        if node.op_type in _NONDETERMINISTIC or node.op_type == "Constant" or not node.outputs:
            return False
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return False
        total = 0
        for v in node.inputs:
            if v is None:
                continue
            tensor = v.const_value if v.is_initializer() else None
            if tensor is not None and (tensor.dtype in _FLOAT or tensor.nbytes > _MAX_BYTES):
                return False  # a weight (or quantised weight): never read, never folded
            array = _ir.const_array(v)
            if array is None:
                return False
            total += array.nbytes
        return total <= _MAX_BYTES

    def _fold_operands(self, graph: ir.Graph, node: ir.Node, assumed: list) -> bool:
        """Pad pads, Slice bounds, Split sizes computed from static dims become constants."""
        modified = False
        for i in _STATIC_OPERANDS[node.op_type]:
            if i >= len(node.inputs) or node.inputs[i] is None or _ir.const_array(node.inputs[i]) is not None:
                continue
            reads: dict[ir.Value, set[int]] = {}
            array = self._static_value(node.inputs[i], reads, depth=0)
            if array is None:
                continue
            if node.op_type == "Reshape" and (
                _static_shape(node.outputs[0]) is not None
                or not all(dims <= {0} or (v.shape is not None and v.shape.rank() <= 2) for v, dims in reads.items())
            ):
                continue  # shape inference followed it, or it reads image sizes: passes/densify_reshapes.py
            nodes: list[ir.Node] = []
            editor = _ir.Editor(graph)
            value = editor.const(nodes, np.array(array, order="C"), base=f"{node.inputs[i].name or node.op_type}_static")
            graph.insert_before(node, nodes)
            node.replace_input_with(i, value)
            modified = True
            if node.op_type != "Pad":  # Pad amounts at the static size are TF's SAME, like auto_pad
                label = f"'{node.name or '<unnamed>'}' ({node.op_type})"
                for value, dims in reads.items():
                    assumed.append((value, tuple(sorted(dims)), label))
        return modified

    def _inline_if(self, graph: ir.Graph, node: ir.Node, assumed: list) -> bool:
        reads: dict[ir.Value, set[int]] = {}
        cond = self._static_value(node.inputs[0], reads, depth=0)
        if cond is None or cond.size != 1:
            return False
        branch = node.attributes["then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"].as_graph()
        for inner in list(branch):
            branch.remove(inner)
            graph.insert_before(node, inner)
        for out, new in zip(node.outputs, list(branch.outputs)):
            _ir.replace_value(out, new)
        graph.remove(node, safe=True)
        label = f"'{node.name or '<unnamed>'}' (If)"
        for value, dims in reads.items():
            assumed.append((value, tuple(sorted(dims)), label))
        return True

    def at_static_size(self, value: ir.Value | None) -> np.ndarray | None:
        """``value`` computed at the static input size, where constants and static dims give it
        (for shape inference only: static_shapes.py; nothing is folded)."""
        return self._static_value(value, {}, depth=0)

    def _static_value(self, value: ir.Value | None, reads: dict, depth: int) -> np.ndarray | None:
        """The value at the static input size, noting which dims of which tensors it read."""
        if value is None or depth > 32:
            return None
        array = _ir.const_array(value)
        if array is not None:
            return array
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Shape":
            return self._shape_slice(node, reads, None)
        source = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if node.op_type in ("Gather", "Slice") and source is not None and source.op_type == "Shape":
            dims = _static_shape(source.inputs[0])
            if dims is None:
                return None
            index = np.arange(len(dims))[_shape_range(source, len(dims))]
            picked = _evaluate(node, [index] + [_ir.const_array(v) for v in node.inputs[1:]], self.opset)
            if picked is None:
                return None
            reads.setdefault(source.inputs[0], set()).update(int(i) for i in np.asarray(picked[0]).reshape(-1))
            return np.asarray(dims, dtype=np.int64)[np.asarray(picked[0], dtype=np.int64)]
        if not self._evaluable(node):
            return None
        inputs = [self._static_value(v, reads, depth + 1) if v is not None else None for v in node.inputs]
        if any(a is None for a, v in zip(inputs, node.inputs) if v is not None):
            return None
        values = _evaluate(node, inputs, self.opset)
        return None if values is None else values[list(node.outputs).index(value)]

    def _evaluable(self, node: ir.Node) -> bool:
        return node.op_type not in _NONDETERMINISTIC and not any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()
        )

    def _shape_slice(self, node: ir.Node, reads: dict, _unused) -> np.ndarray | None:
        dims = _static_shape(node.inputs[0])
        if dims is None:
            return None
        index = np.arange(len(dims))[_shape_range(node, len(dims))]
        reads.setdefault(node.inputs[0], set()).update(int(i) for i in index)
        return np.asarray(dims, dtype=np.int64)[index]


def _static_shape(value: ir.Value) -> list[int] | None:
    dims = _ir.static_dims(value)
    if dims is None or any(d is None for d in dims):
        return None
    return list(dims)


def _shape_range(node: ir.Node, rank: int) -> slice:
    """Shape's optional start/end attributes (opset 15) as a slice."""
    return slice(node.attributes.get_int("start", 0), node.attributes.get_int("end", rank))


def _evaluate(node: ir.Node, inputs: list, opset: int) -> list[np.ndarray] | None:
    """Run one node in onnx's reference evaluator; None when it cannot."""
    proto = ir.serde.serialize_node(node)
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    outputs = [f"out{i}" for i in range(len(node.outputs))]
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(outputs)
    initializers = [
        onnx.numpy_helper.from_array(np.asarray(a), name) for name, a in zip(names, inputs) if name and a is not None
    ]
    graph = onnx.helper.make_graph([proto], "fold", [], [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in outputs], initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, {})]
    except Exception:  # anything the reference evaluator cannot run stays in the graph
        return None


def _replace_with_constants(graph: ir.Graph, node: ir.Node, values: list[np.ndarray]) -> None:
    for out, array in zip(node.outputs, values):
        name = out.name
        # np.array, not np.ascontiguousarray: the latter makes a scalar [1] (ndim >= 1), and an
        # Unsqueeze then Concat of folded scalars (timm's TF-SAME pads) would get the wrong rank
        const = ir.node("Constant", [], {"value": ir.tensor(np.array(array, order="C"), name=name)})
        new = const.outputs[0]
        new.shape = ir.Shape(array.shape)
        new.dtype = ir.DataType.from_numpy(array.dtype)
        graph.insert_before(node, const)
        _ir.replace_value(out, new)
        out.name = None
        new.name = name
        const.name = f"{node.name or node.op_type}_folded" if len(values) == 1 else None
    graph.remove(node, safe=True)
