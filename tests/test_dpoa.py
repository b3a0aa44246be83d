"""dpoa export: the weights trained on the dense model back in the original architecture.

A ResNet (BatchNorm kept, a classifier head the rewrite turns into a dilated window) is made
dense, trained a few steps with BatchNorm in training mode (so its statistics change too),
and exported back. OUT must be ORIGINAL byte for byte once initializer data is masked, with
every trained weight changed, and `verify(OUT, TRAINED_DENSE)` must pass. Mismatched weights,
OUT == ORIGINAL and unreadable TRAINED are refused in one line, exit 2, with nothing written.
"""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import onnx
import pytest

import onnx_dense
from onnx_dense.errors import DenseError
from onnx_dense.train import dpoa, train

from _train_fixtures import export_zoo, shared_root

import torch
from tests._cli import run, assert_clean_error

torch.set_num_threads(1)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _masked(path) -> bytes:
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        for field in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
            init.ClearField(field)
    return proto.SerializeToString(deterministic=True)


def _inits(path) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = shared_root(tmp_path_factory)
    work = tmp_path_factory.mktemp("dpoa")
    original = export_zoo(root, "resnet")
    dense = work / "resnet_dense.onnx"
    onnx_dense.rewrite(original, dense, output_stride=8)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 3, 64, 64)).astype(np.float32)
    labels = rng.integers(0, 10, 4)
    result = train(
        str(dense), task="classification", data=(images, labels), steps=2, batch_size=2, lr=0.05,
        train_bn=True, checkpoint_dir=work / "ck", out=work / "resnet_dense_trained.onnx", progress=False,
    )
    return {
        "original": original, "dense": str(dense), "checkpoint": str(result.checkpoint),
        "trained_dense": str(result.onnx_out), "work": work, "original_digest": _digest(original),
    }


def test_cli_export_from_checkpoint(trained, tmp_path):
    out, dense_out = tmp_path / "dpoa.onnx", tmp_path / "dense_again.onnx"
    code, stdout, stderr = run("export-dpoa", trained["original"], trained["checkpoint"], out, "--dense-out", dense_out, "--verify")
    assert code == 0, stderr
    assert "PASSED" in stdout
    # only initializer values differ
    assert _masked(out) == _masked(trained["original"])
    before, after = _inits(trained["original"]), _inits(out)
    assert list(before) == list(after)
    assert all(before[k].shape == after[k].shape and before[k].dtype == after[k].dtype for k in before)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    # every conv/linear weight and BatchNorm tensor of the original was trained
    floats = [k for k in before if before[k].dtype == np.float32 and before[k].ndim > 0]
    assert set(changed) == set(floats), sorted(set(floats) - set(changed))[:5]
    assert any("running_mean" in k for k in changed)  # train_bn: statistics trained too
    # the trained values are those of the trained dense model
    trained_dense = _inits(trained["trained_dense"])
    assert all(np.array_equal(after[k], trained_dense[k]) for k in floats)
    # --dense-out wrote the same trained dense model
    assert _masked(dense_out) == _masked(trained["trained_dense"])
    assert all(np.array_equal(v, trained_dense[k]) for k, v in _inits(dense_out).items())
    # equivalence survives training, checked independently
    report = onnx_dense.verify(str(out), trained["trained_dense"])
    assert report, report.text()
    assert _digest(trained["original"]) == trained["original_digest"], "ORIGINAL was modified"


def test_export_from_trained_onnx_needs_no_checkpoint(trained, tmp_path):
    out = tmp_path / "dpoa.onnx"
    result = dpoa.export_dpoa(trained["original"], trained["trained_dense"], out)
    assert result.replaced > 0 and result.changed > 0
    assert _masked(out) == _masked(trained["original"])
    trained_dense = _inits(trained["trained_dense"])
    assert all(np.array_equal(v, trained_dense[k]) for k, v in _inits(out).items() if v.dtype == np.float32 and v.ndim)
    code, stdout, stderr = run("verify", out, trained["trained_dense"])
    assert code == 0, stdout + stderr


def test_outputs_get_the_usual_file_mode(trained, tmp_path):
    """Like every model onnx-dense saves: 0666 minus the umask, not mkstemp's 0600."""
    mask = os.umask(0)
    os.umask(mask)
    dpoa.export_dpoa(trained["original"], trained["trained_dense"], tmp_path / "dpoa.onnx")
    assert stat.S_IMODE(os.stat(tmp_path / "dpoa.onnx").st_mode) == 0o666 & ~mask


def test_out_equal_to_original_is_refused(trained, tmp_path):
    code, out, err = run("export-dpoa", trained["original"], trained["checkpoint"], trained["original"])
    assert_clean_error(code, out, err, "refusing to overwrite")
    assert _digest(trained["original"]) == trained["original_digest"]


def test_wrong_checkpoint_is_refused(trained, tmp_path_factory, tmp_path):
    other = export_zoo(shared_root(tmp_path_factory), "fcn")
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run("export-dpoa", other, trained["checkpoint"], out)
    assert_clean_error(code, stdout, stderr, "was not trained from a dense model of ORIGINAL")
    assert not out.exists()


def test_shape_mismatch_is_refused(trained, tmp_path):
    from samples import zoo
    from samples.export import export_onnx

    wide = zoo.build("resnet", width=16)  # the same names, other shapes
    original = export_onnx(wide, wide.input_shape, tmp_path / "resnet16.onnx", keep_batchnorm=True)
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run("export-dpoa", original, trained["trained_dense"], out)
    assert_clean_error(code, stdout, stderr, "has shape", "conv1.weight")
    assert not out.exists()


def test_bad_trained_files(trained, tmp_path):
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run("export-dpoa", trained["original"], tmp_path / "missing.pt", out)
    assert_clean_error(code, stdout, stderr, "no such file")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    code, stdout, stderr = run("export-dpoa", trained["original"], junk, out)
    assert_clean_error(code, stdout, stderr, "not an onnx-dense checkpoint")
    assert not out.exists()


def test_dense_out_needs_a_dense_model(trained, tmp_path):
    with pytest.raises(DenseError, match="--dense"):
        dpoa.export_dpoa(trained["original"], dict(_inits(trained["trained_dense"])), tmp_path / "o.onnx",
                         dense_out=tmp_path / "d.onnx")


def test_save_onnx_of_a_model_trained_from_the_original(trained, tmp_path):
    """save_onnx writes the graph that was trained, here the original: dpoa.write_trained."""
    rng = np.random.default_rng(1)
    images = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    result = train(trained["original"], task="classification", data=(images, np.array([3, 7])), steps=1,
                   batch_size=2, lr=0.05, progress=False)
    out = result.save_onnx(tmp_path / "original_trained.onnx")
    assert _masked(out) == _masked(trained["original"])  # only the weights differ
    weights = result.state_dict_onnx()
    after = _inits(out)
    assert all(np.array_equal(after[k], v) for k, v in weights.items())
    assert any(not np.array_equal(after[k], v) for k, v in _inits(trained["original"]).items())
    assert _digest(trained["original"]) == trained["original_digest"], "ORIGINAL was modified"
    # the same through the function itself, from a dict of weights; never over the model it reads
    again = dpoa.write_trained(trained["original"], weights, tmp_path / "again.onnx")
    assert _digest(again) == _digest(out)
    with pytest.raises(DenseError, match="refusing to overwrite"):
        dpoa.write_trained(trained["original"], weights, trained["original"])
    assert _digest(trained["original"]) == trained["original_digest"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic: no temporary left
    # a module built from a ModelProto in memory: the proto is copied, not edited
    proto = onnx.load(trained["original"])
    before = proto.SerializeToString()
    in_memory = train(proto, task="classification", data=(images, np.array([3, 7])), steps=1, batch_size=2,
                      lr=0.05, progress=False)
    out = in_memory.save_onnx(tmp_path / "from_proto.onnx")
    assert proto.SerializeToString() == before
    assert _masked(out) == _masked(trained["original"])
    assert all(np.array_equal(_inits(out)[k], v) for k, v in in_memory.state_dict_onnx().items())
