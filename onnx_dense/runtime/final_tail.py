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
"""

from __future__ import annotations

import dataclasses

import onnx

from onnx_dense import metadata


@dataclasses.dataclass
class Split:
    body: onnx.ModelProto  # every output but the rebuilt ones; onnx_dense metadata for them
    tail: onnx.ModelProto  # score maps (and graph inputs it reads) -> the rebuilt outputs
    tail_inputs: list[str]  # score maps first, then graph inputs, then the shapes below
    rebuilt: list[str]
    shapes: dict[str, str] = dataclasses.field(default_factory=dict)  # tail input -> the graph input it is the Shape of


def rebuilt_outputs(info: metadata.DenseInfo) -> list[str]:
    return [name for name, out in info.outputs.items() if out.upsampling]


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
    return Split(body, tail_model, scores + needed + list(shapes), rebuilt, shapes)


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
