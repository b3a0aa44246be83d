"""The sample zoo exports with both torch exporters and runs in onnxruntime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from samples import zoo
from samples.export import EXPORTERS, export_onnx
from samples.make_samples import main as make_samples_main

NAMES = [*zoo.ZOO, *zoo.VARIANTS]
BN_MODELS = ["resnet", "mobilenetv2", "inception", "conv1d"]


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _check(model, path, x: torch.Tensor) -> onnx.ModelProto:
    with torch.no_grad():
        ref = model(x).numpy()
    got = _session(path).run(None, {"input": x.numpy()})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    return onnx.load(str(path))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_export_matches_torch(name, exporter, tmp_path):
    model = zoo.build(name)
    x = zoo.example_input(name, seed=1)
    path = export_onnx(model, model.input_shape, tmp_path / f"{name}.onnx", exporter=exporter)
    proto = _check(model, path, x)
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert tuple(dims) == model.input_shape
    opset = {o.domain: o.version for o in proto.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == 20
    init_names = {i.name for i in proto.graph.initializer}
    # Layers not fused with a BatchNorm keep their PyTorch parameter names.
    for pname, p in model.named_parameters():
        if pname.startswith(("classifier.", "fc.")) or name in ("vgg", "fcn", "alexnet", "alexnet_lrn"):
            assert pname in init_names, pname
    if name == "alexnet_lrn":
        assert sum(n.op_type == "LRN" for n in proto.graph.node) == 2


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", BN_MODELS)
def test_keep_batchnorm(name, exporter, tmp_path):
    model = zoo.build(name)
    path = export_onnx(model, None, tmp_path / "m.onnx", exporter=exporter, keep_batchnorm=True)
    proto = _check(model, path, zoo.example_input(name, seed=2))
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == n_bn
    init_names = {i.name for i in proto.graph.initializer}
    missing = [k for k in model.state_dict() if not k.endswith("num_batches_tracked") and k not in init_names]
    assert not missing


@pytest.mark.parametrize(
    "name, exporter",
    [(n, "torchscript") for n in zoo.ZOO] + [("vgg", "dynamo"), ("alexnet", "dynamo"), ("conv1d", "dynamo")],
)
def test_dynamic_batch(name, exporter, tmp_path):
    model = zoo.build(name)
    path = export_onnx(model, None, tmp_path / "m.onnx", exporter=exporter, dynamic_batch=True)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 3):
        _check(model, path, zoo.example_input(name, batch=batch, seed=batch))


def test_dynamo_rejects_old_opset(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(zoo.conv1d(), None, tmp_path / "m.onnx", exporter="dynamo", opset=17)


def test_torchscript_older_opset(tmp_path):
    model = zoo.mobilenetv2()
    path = export_onnx(model, None, tmp_path / "m.onnx", exporter="torchscript", opset=13)
    proto = _check(model, path, zoo.example_input(model))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 13


@pytest.mark.parametrize("name", NAMES)
def test_builders_deterministic_and_nontrivial(name):
    a, b, c = zoo.build(name), zoo.build(name), zoo.build(name, seed=1)
    assert not a.training
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert all(torch.isfinite(v).all() for v in sa.values() if v.is_floating_point())
    for m in a.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
            assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))
            assert not torch.allclose(m.weight, torch.ones_like(m.weight))
    x = zoo.example_input(name)
    assert tuple(x.shape) == a.input_shape == zoo.DEFAULT_INPUT_SHAPES[name]
    assert torch.equal(x, zoo.example_input(a))
    assert zoo.example_input(name, batch=4).shape[0] == 4
    with torch.no_grad():
        y = a(x)
    assert torch.isfinite(y).all() and 0.01 < float(y.std()) < 100


def test_alexnet_ceil_mode_really_matters():
    """At least one ceil_mode pool has a partial last window at the default size."""
    model = zoo.alexnet()
    sizes = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: sizes.append((inp[0].shape[-1], out.shape[-1])))
        for m in model.modules()
        if isinstance(m, torch.nn.MaxPool2d)
    ]
    with torch.no_grad():
        model(zoo.example_input(model))
    for h in hooks:
        h.remove()
    assert len(sizes) == 3
    floor_sizes = [(s - 3) // 2 + 1 for s, _ in sizes]
    assert [o for _, o in sizes] == [math.ceil((s - 3) / 2) + 1 for s, _ in sizes]
    assert sum(o != f for (_, o), f in zip(sizes, floor_sizes)) >= 1
    assert sizes == [(17, 8), (8, 4), (4, 2)]


def test_shapes_of_fully_convolutional_models():
    with torch.no_grad():
        assert zoo.fcn()(zoo.example_input("fcn")).shape == (1, 5, 2, 2)
        assert zoo.conv1d()(zoo.example_input("conv1d")).shape == (1, 5, 16)


def test_make_samples(tmp_path, capsys):
    assert make_samples_main([str(tmp_path), "--models", "conv1d,fcn"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("conv1d") and lines[2].startswith("images")
    # the README's pictures and labelled folder: every image has its label map and class
    from PIL import Image

    assert Image.open(tmp_path / "scene.jpg").size == (208, 160) and (tmp_path / "shapes.png").is_file()
    stems = sorted(p.stem for p in (tmp_path / "data" / "images").glob("*.png"))
    assert stems == sorted(p.stem for p in (tmp_path / "data" / "labels").glob("*.png")) and len(stems) == 16
    rows = dict(line.split(",") for line in (tmp_path / "data" / "labels.csv").read_text().split())
    for stem in stems:
        label = np.asarray(Image.open(tmp_path / "data" / "labels" / f"{stem}.png"))
        assert set(np.unique(label)) == {0, int(rows[stem]) + 1}  # the shape's pixels carry its class + 1
    for name in ("conv1d", "fcn"):
        model = zoo.build(name)
        _check(model, tmp_path / f"{name}.onnx", zoo.example_input(name))


def test_default_export_folds_batchnorm_again_after_keep(tmp_path):
    """keep_batchnorm=True must not leak into later dynamo exports."""
    model = zoo.conv1d()
    kept = export_onnx(model, None, tmp_path / "kept.onnx", exporter="dynamo", keep_batchnorm=True)
    folded = export_onnx(model, None, tmp_path / "folded.onnx", exporter="dynamo")
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(kept)).graph.node)
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(folded)).graph.node)
