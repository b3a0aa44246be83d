"""Helpers for tests/test_rules.py: tiny models from ONNX text, run in ORT as written.

``build(text)`` parses a model with :func:`onnx.parser.parse_model`; every graph input
after the first ``n_inputs`` becomes an initializer filled with seeded random values of
its declared shape (names containing ``var`` get positive values, for BatchNorm), so the
model text only states the graph. ``densify`` rewrites it with the public API and checks
it numerically: ORT with every graph optimisation off, the dense output sampled every
eST positions (from the dense model's metadata) against the original, and
``onnx_dense.verify`` on top.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort

import onnx_dense
from onnx_dense import metadata

RTOL = 1e-5


def dense_zoo(directory, name: str, output_stride, *, stem: str | None = None) -> str:
    """``samples.zoo.build(name)`` exported by TorchScript to ``directory/STEM.onnx`` and
    rewritten to ``directory/STEM_dense.onnx`` (STEM defaults to ``name``); the dense path."""
    from samples import export, zoo

    stem = stem or name
    export.export_onnx(zoo.build(name), None, directory / f"{stem}.onnx")
    onnx_dense.rewrite(directory / f"{stem}.onnx", directory / f"{stem}_dense.onnx", output_stride=output_stride)
    return str(directory / f"{stem}_dense.onnx")


def build(text: str, *, n_inputs: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Parse ``text``; graph inputs after the first ``n_inputs`` become random initializers.

    An output declared without dims (``float y``) gets no shape at all (not rank 0), so the
    text need not spell out output sizes.
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    graph = model.graph
    for vi in graph.output:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and len(tt.shape.dim) == 0:
            tt.ClearField("shape")
    keep = list(graph.input[:n_inputs])
    for vi in graph.input[n_inputs:]:
        tt = vi.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if "var" in vi.name:
            arr = rng.uniform(0.5, 1.5, dims)
        else:
            arr = rng.standard_normal(dims)
        graph.initializer.append(onnx.numpy_helper.from_array(arr.astype(dtype), vi.name))
    del graph.input[:]
    graph.input.extend(keep)
    if any(not vi.type.tensor_type.HasField("shape") for vi in graph.output):
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


#: A conv, a stride-2 pool and a stride-2 conv (output stride 4), its two weights outside the
#: signature: the tiny model of the CLI and runtime tests (``with_weights(TINY_NET, TINY_WEIGHTS)``).
TINY_NET = """
<ir_version: 9, opset_import: ["" : 20]>
net (float[1,3,32,32] input) => (float[1,4,8,8] output) <float[8,3,3,3] w1, float[4,8,3,3] w2> {
    c1 = Conv <pads = [1,1,1,1]> (input, w1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r1)
    c2 = Conv <pads = [1,1,1,1], strides = [2,2]> (p1, w2)
    output = Relu (c2)
}
"""
TINY_WEIGHTS = {"w1": (8, 3, 3, 3), "w2": (4, 8, 3, 3)}

#: TINY_NET without its last Relu (signed scores, so label maps show several classes): the
#: model of the run, Ray and windowed tests, weights TINY_WEIGHTS added by each.
SEG = """
<ir_version: 9, opset_import: ["" : 20]>
seg (float[1,3,32,32] input) => (float[1,4,8,8] output) <float[8,3,3,3] w1, float[4,8,3,3] w2> {
    c1 = Conv <pads = [1,1,1,1]> (input, w1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r1)
    output = Conv <pads = [1,1,1,1], strides = [2,2]> (p1, w2)
}
"""


def with_weights(text: str, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> onnx.ModelProto:
    """Parse ``text`` and add seeded random float32 initializers of these names and shapes (the text
    leaves them out of its signature); an output declared without dims gets no shape."""
    model = onnx.parser.parse_model(text)
    for vi in model.graph.output:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and len(tt.shape.dim) == 0:
            tt.ClearField("shape")
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    return model


def graph(signature: str, body: str, *, opset: int = 20, outputs: str = "float y", domains: str = "", **kw):
    """``build`` of a one-graph model: ``signature`` lists the data input, then the weights."""
    ir_version = max(7, onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)]))
    text = (
        f'<ir_version: {ir_version}, opset_import: ["" : {opset}{domains}]>\n'
        f"g ({signature}) => ({outputs}) {{\n{body}\n}}\n"
    )
    return build(text, **kw)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def feeds_for(model: onnx.ModelProto, seed: int = 1, shapes: dict[str, tuple[int, ...]] | None = None):
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        dims = (shapes or {}).get(vi.name) or [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        out[vi.name] = rng.standard_normal(dims).astype(dtype)
    return out


def rewrite(model: onnx.ModelProto, output_stride=None, **kwargs) -> onnx.ModelProto:
    """The dense model as a ModelProto (the input proto is left untouched). Strategy "dilate"
    unless given: the rule tests check the dilated rewrite and its refusals, not "auto"."""
    kwargs.setdefault("strategy", "dilate")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    dense = onnx_dense.rewrite_model(copy, output_stride=output_stride, **kwargs)
    return ir.serde.serialize_model(dense)


def info(dense: onnx.ModelProto) -> metadata.DenseInfo:
    result = metadata.read(dense)
    assert result is not None, "dense model has no onnx_dense metadata"
    return result


def sample(dense_out: np.ndarray, out: metadata.DenseOutput) -> np.ndarray:
    """Dense output sampled every eST positions on its spatial axes (independent of verify)."""
    index = [slice(None)] * dense_out.ndim
    for a, e in zip(out.spatial_axes, out.est):
        index[a] = slice(0, None, e)
    sampled = dense_out[tuple(index)]
    if out.inserted:
        assert all(sampled.shape[a] == 1 for a in out.spatial_axes), sampled.shape
        sampled = sampled.reshape([d for i, d in enumerate(sampled.shape) if i not in out.spatial_axes])
    return sampled


def assert_close(expected: np.ndarray, got: np.ndarray, rtol: float = RTOL, what: str = "") -> None:
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != original {expected.shape}"
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    err = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))) if expected.size else 0.0
    assert err <= rtol * max(scale, 1e-6), f"{what}: max abs err {err:.3e} > {rtol:g} * scale {scale:.3e}"


def check_dense(
    original: onnx.ModelProto,
    dense: onnx.ModelProto,
    *,
    feeds: dict[str, np.ndarray] | None = None,
    est: tuple[int, ...] | dict[str, tuple[int, ...]] | None = None,
    phases: bool = True,
) -> dict[str, np.ndarray]:
    """Numerical equivalence of ``dense`` and ``original``; returns the dense outputs.

    ``est``: the eST every output (or each named output) must have, checked against the
    metadata so a rewrite that removes no stride cannot pass by accident.
    """
    onnx.checker.check_model(dense)
    meta = info(dense)
    feeds = feeds or feeds_for(original)
    names = [o.name for o in dense.graph.output]
    expected = run(with_outputs(original, dense.graph.output), feeds)
    got = run(dense, feeds)
    for name in names:
        ref = expected[name]
        out = meta.outputs.get(name)
        if out is None:
            assert_close(ref, got[name], what=name)
            continue
        if est is not None:
            want = est[name] if isinstance(est, dict) else est
            assert tuple(out.est) == tuple(want), f"{name}: eST {out.est}, expected {want}"
        assert_close(ref, sample(got[name], out), what=name)
    report = onnx_dense.verify(original, dense, inputs=feeds, phases=phases)
    assert report, report.text()
    return got


def with_outputs(model: onnx.ModelProto, outputs) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are ``outputs`` (ValueInfos of the dense model)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    for vi in outputs:
        copy.graph.output.append(onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, None))
    return copy


def nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    found = [n for n in model.graph.node if n.name == name]
    assert len(found) == 1, f"no single node named {name!r}: {[n.name for n in model.graph.node]}"
    return found[0]


def attrs(n: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}


def ints(n: onnx.NodeProto, name: str, default=None):
    value = attrs(n).get(name, default)
    return list(value) if isinstance(value, (list, tuple)) else value


def const_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of an initializer or Constant output called ``name``."""
    for init in model.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return onnx.numpy_helper.to_array(attrs(n)["value"])
    raise KeyError(name)



def json_child(code: str, *args, timeout: int = 300) -> dict:
    """Run ``code`` with ``args`` in a fresh Python process (its own peak memory; this checkout on
    its path) and return its last line of output, read as JSON; its stderr if it fails."""
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
