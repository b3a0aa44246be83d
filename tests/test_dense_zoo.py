"""End to end: every zoo family, both torch exporters, every output stride the model allows.

The original is exported from PyTorch; the dense model must equal it on the subgrid (fp32,
<= 1e-5 relative to the output's scale), share its weights by name, run at another input
size (no traced size baked in), and, for the fully convolutional ones, match the original
on shifted inputs at every off-grid phase.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_dense
from onnx_dense import api, metadata
from samples import zoo
from samples.export import EXPORTERS, export_onnx

# Largest output stride of each family (every power of two up to it must be reachable).
MAX_STRIDE = {
    "vgg": 32, "fcn": 16, "resnet": 32, "mobilenetv2": 32, "inception": 16, "alexnet": 32, "conv1d": 8,
    "resnet_bottleneck": 32, "inception_3x3": 16, "alexnet_lrn": 32,
}
FULLY_CONVOLUTIONAL = {"fcn", "conv1d"}


def _strides(name):
    r, out = 1, []
    while r <= MAX_STRIDE[name]:
        out.append(r)
        r *= 2
    return out


CASES = [(n, e, r) for n in MAX_STRIDE for e in EXPORTERS for r in _strides(n)]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    cache: dict[tuple[str, str], str] = {}
    root = tmp_path_factory.mktemp("zoo")

    def get(name: str, exporter: str) -> str:
        if (name, exporter) not in cache:
            model = zoo.build(name)
            cache[(name, exporter)] = str(
                export_onnx(model, model.input_shape, root / f"{name}_{exporter}.onnx", exporter=exporter)
            )
        return cache[(name, exporter)]

    return get


@pytest.mark.parametrize("name", list(MAX_STRIDE))
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_reachable_strides(name, exporter, exported):
    assert [r for (r,) in api.output_strides(exported(name, exporter))] == _strides(name)


@pytest.mark.parametrize("name, exporter, stride", CASES)
def test_dense_equals_original(name, exporter, stride, exported, tmp_path):
    src = exported(name, exporter)
    before = open(src, "rb").read()
    dst = tmp_path / "dense.onnx"
    model = onnx_dense.rewrite(src, dst, output_stride=stride)
    assert open(src, "rb").read() == before, "the input model was modified"
    info = metadata.read(onnx.load(str(dst)))
    (out,) = info.outputs.values()
    assert out.stride == (min(stride, MAX_STRIDE[name]),) * len(out.stride)
    assert out.est == tuple(s // d for s, d in zip(out.original_stride, out.stride))
    phases = name in FULLY_CONVOLUTIONAL and stride < MAX_STRIDE[name]
    report = onnx_dense.verify(src, dst, phases=phases, max_phases=16, rtol=1e-5)
    assert report, report.text()
    checks = {c.check for c in report.comparisons}
    assert {"subgrid", "weights", "any size"} <= checks
    if phases:
        assert any(c.check.startswith("phase ") and c.compared for c in report.comparisons), report.text()
    subgrid = next(c for c in report.comparisons if c.check == "subgrid")
    assert subgrid.compared > 0 and subgrid.max_rel <= 1e-5
    # Every original weight keeps its name and shape: dpoa needs nothing else.
    original = {i.name: tuple(i.dims) for i in onnx.load(src).graph.initializer}
    dense = {n: tuple(v.shape) for n, v in model.graph.initializers.items()}
    assert all(dense.get(k) == v for k, v in original.items() if k in dense)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dense_output_at_other_sizes_still_equals_original(exporter, exported, tmp_path):
    """The FCN's dense model at a size it was not rewritten for, against the original at that size."""
    src = exported("fcn", exporter)
    dst = tmp_path / "dense.onnx"
    onnx_dense.rewrite(src, dst, output_stride=4)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.random.default_rng(3).standard_normal((1, 3, 96, 80)).astype(np.float32)
    dense = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    model = zoo.build("fcn")
    import torch

    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    sampled = dense[:, :, ::4, ::4]
    assert sampled.shape == ref.shape
    np.testing.assert_allclose(sampled, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
