"""Small helpers over onnx-ir shared by the passes: reading attributes, constants and shapes.

onnx-ir gives raw attribute access; the spatial ops need their ONNX defaults filled in
(strides 1, pads 0, kernel from the weight), which is what these helpers add.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

import numpy as np
import onnx_ir as ir

from onnx_dense.errors import DenseError, UnsupportedNodeError
from onnx_dense.grid import PLAN

P = TypeVar("P")

SPATIAL_OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool")
GLOBAL_OPS = ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")


@dataclasses.dataclass(frozen=True)
class WindowParams:
    """Kernel, stride, dilation and explicit pads of a Conv or pooling node (ONNX defaults applied)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]

    @property
    def effective_kernel(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilations))


def window_params(node: ir.Node) -> WindowParams:
    attrs = node.attributes
    kernel = attrs.get_ints("kernel_shape")
    if kernel is None:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        shape = weight.shape if weight is not None else None
        if shape is None or not shape.is_static():
            raise UnsupportedNodeError(
                node, "kernel size unknown (no kernel_shape and the weight has no static shape)"
            )
        kernel = tuple(int(d) for d in shape[2:])
    kernel = tuple(int(k) for k in kernel)
    n = len(kernel)
    strides = tuple(attrs.get_ints("strides", (1,) * n))
    dilations = tuple(attrs.get_ints("dilations", (1,) * n))
    pads = tuple(attrs.get_ints("pads", (0,) * (2 * n)))
    if len(strides) != n or len(dilations) != n or len(pads) != 2 * n:
        raise UnsupportedNodeError(node, "strides/dilations/pads do not match the kernel rank", "fix the model")
    return WindowParams(kernel, strides, dilations, pads[:n], pads[n:])


def planned(graph: ir.Graph, *plan_types: type[P]) -> list[tuple[ir.Node, P]]:
    """The top-level nodes of ``graph`` whose ``meta[PLAN]`` is one of ``plan_types``, with it, in graph order.

    A list taken before the caller starts, so a pass may insert and remove nodes while it walks
    it (nodes it adds are not visited). Subgraphs are not entered, like plain graph iteration.
    """
    return [(node, plan) for node in graph if isinstance(plan := node.meta.get(PLAN), plan_types)]


def set_ints(node: ir.Node, name: str, values: Sequence[int]) -> None:
    node.attributes[name] = ir.AttrInt64s(name, [int(v) for v in values])


def set_int(node: ir.Node, name: str, value: int) -> None:
    node.attributes[name] = ir.AttrInt64(name, int(value))


def opset(model_or_graph) -> int:
    imports = model_or_graph.opset_imports
    return int(imports.get("", imports.get("ai.onnx", 0)))


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as a numpy array when it is an initializer or Constant output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
        for name, kind in (("value_int", int), ("value_float", float)):
            if name in producer.attributes:
                return np.array(kind(producer.attributes[name].value))
        for name in ("value_ints", "value_floats"):
            if name in producer.attributes:
                return np.array(list(producer.attributes[name].value))
    return None


def static_dims(value: ir.Value) -> tuple[int | None, ...] | None:
    """Shape with symbolic or unknown dims as None; None when even the rank is unknown."""
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape.dims)


def constant(graph_nodes: list[ir.Node], array: np.ndarray, name: str) -> ir.Value:
    """A Constant node holding ``array``; appended to ``graph_nodes`` for the caller to insert."""
    node = ir.node("Constant", [], {"value": ir.tensor(array, name=name)}, name=name)
    node.outputs[0].name = name
    graph_nodes.append(node)
    return node.outputs[0]


def require_static(value: ir.Value, what: str, node: ir.Node) -> tuple[int, ...]:
    dims = static_dims(value)
    if dims is None or any(d is None for d in dims[1:]):
        raise DenseError(
            f"node '{node.name}' ({node.op_type}): the shape of {what} '{value.name}' is not known "
            "statically; give the input size with --input-shape NAME:1,3,H,W"
        )
    return dims  # type: ignore[return-value]


def normalise_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


class Editor:
    """Builds new nodes with names unique in ``graph`` and inserts them next to an anchor.

    A thin layer over :class:`onnx_ir.tape.Tape`: the tape records nodes, this adds
    collision-free names derived from the node being rewritten, so a dense graph stays
    readable ("features.5/MaxPool_pad") and valid.
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._names: set[str] = set()
        for node in graph:
            if node.name:
                self._names.add(node.name)
            for out in node.outputs:
                if out.name:
                    self._names.add(out.name)
        for value in list(graph.inputs) + list(graph.initializers.values()):
            if value.name:
                self._names.add(value.name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def op(self, nodes: list[ir.Node], op_type: str, inputs, attributes=None, *, base: str, num_outputs: int = 1):
        node = ir.node(op_type, inputs, attributes, name=self.fresh(base), num_outputs=num_outputs)
        for i, out in enumerate(node.outputs):
            out.name = self.fresh(f"{base}_out" if num_outputs == 1 else f"{base}_out{i}")
        nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else node.outputs

    def const(self, nodes: list[ir.Node], array, *, base: str) -> ir.Value:
        array = np.asarray(array)
        name = self.fresh(base)
        node = ir.node("Constant", [], {"value": ir.tensor(array, name=name)}, name=self.fresh(f"{base}_node"))
        node.outputs[0].name = name
        node.outputs[0].shape = ir.Shape(array.shape)
        node.outputs[0].dtype = ir.DataType.from_numpy(array.dtype)
        nodes.append(node)
        return node.outputs[0]

    def pad(self, nodes: list[ir.Node], x: ir.Value, begin, end, *, base: str, value: float, dtype) -> ir.Value:
        """Pad ``x`` (opset >= 11 form); ``begin``/``end`` cover every axis of x."""
        pads = self.const(nodes, np.array(list(begin) + list(end), dtype=np.int64), base=f"{base}_pads")
        fill = self.const(nodes, np.array(value, dtype=dtype), base=f"{base}_value")
        return self.op(nodes, "Pad", [x, pads, fill], {"mode": "constant"}, base=base)


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Point every user of ``old`` (graph outputs included, keeping the output's name) at ``new``.

    ``new`` inherits ``old``'s type and shape when it has none: during the rewrite every value
    carries the original's shape at the static size (later passes read rank and channels from
    it); finalise drops the intermediate shapes.
    """
    graph = old.graph
    if new.type is None and old.type is not None:
        new.type = old.type
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    if graph is not None:
        take_output(graph, old, new)
    old.replace_all_uses_with(new)


def take_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Where ``old`` is a graph output, ``new`` takes its place and its name; the nodes that read
    ``old`` still do (:func:`replace_value` moves them too)."""
    if not old.is_graph_output():
        return
    name = old.name
    old.name = None
    for i, out in enumerate(graph.outputs):
        if out is old:
            graph.outputs[i] = new
    new.name = name


def numpy_dtype(value: ir.Value):
    return value.dtype.numpy() if value.dtype is not None else np.float32
