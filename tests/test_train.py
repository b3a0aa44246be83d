"""Training: data formats and their errors, the losses' geometry, the trainer, the command.

* the documented data formats (folder of images + label PNGs, folder + labels.csv, .npz,
  arrays) load, and bad data is refused in one line naming the file (exit 2 from the CLI);
* segmentation labels are sampled at each prediction's receptive-field centre, upsampled
  scores put each prediction at its centre, classification averages the dense logits,
  regression is L1 of tanh of the average;
* train() lowers the loss, writes checkpoints, resumes, writes the trained dense model;
  evaluate() and predict() report per task; `onnx-dense train` runs end to end and says how
  to install PyTorch when it is missing.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import onnx_dense
from onnx_dense.errors import DenseError
from onnx_dense.train import (
    Geometry, TaskLoss, evaluate, geometry_from, load_checkpoint, open_dataset, predict, train,
)
from onnx_dense.train.losses import sample_labels, upsample_scores

from _train_fixtures import export_zoo, shared_root
from tests._cli import run, assert_clean_error

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fcn_dense(tmp_path_factory):
    """FCN (5 classes, 64x64), dense at output stride 4: predictions every 4 pixels."""
    src = export_zoo(shared_root(tmp_path_factory), "fcn")
    dst = tmp_path_factory.mktemp("fcn") / "fcn_dense.onnx"
    onnx_dense.rewrite(src, dst, output_stride=4)
    return str(dst)


@pytest.fixture(scope="module")
def vgg_dense(tmp_path_factory):
    """VGG (10 classes, 64x64, Flatten+Gemm head), dense at output stride 16."""
    src = export_zoo(shared_root(tmp_path_factory), "vgg")
    dst = tmp_path_factory.mktemp("vgg") / "vgg_dense.onnx"
    onnx_dense.rewrite(src, dst, output_stride=16)
    return str(dst)


def _seg_folder(root, n=4, size=(64, 64), classes=5, label_size=None, seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        h, w = size if not isinstance(size, list) else size[i]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        lh, lw = label_size or (h, w)
        label = rng.integers(0, classes, (lh, lw)).astype(np.uint8)
        label[0, :] = 255  # ignored
        im = Image.fromarray(label, mode="L").convert("P")  # palette indices, as Pascal VOC stores them
        im.save(root / "labels" / f"im{i}.png")
    return root


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def test_folder_formats_load(tmp_path):
    seg = open_dataset(_seg_folder(tmp_path / "seg"), "segmentation", channels=3, num_classes=5)
    image, label = seg[1]
    assert image.shape == (3, 64, 64) and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    assert label.shape == (64, 64) and label.dtype == np.int64 and (label[0] == 255).all()
    cls = tmp_path / "cls"
    (cls / "images").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), mode="L").save(cls / "images" / f"a{i}.jpg")
    (cls / "labels.csv").write_text("name,class\na0.jpg,2\na1,0\na2,1\n")
    ds = open_dataset(cls, "classification", channels=3, mean=[0.5], std=[0.25])
    image, label = ds[2]
    assert image.shape == (3, 8, 8) and int(label) == 1  # grayscale made RGB for a 3-channel model
    np.testing.assert_allclose(image, (80 / 255 - 0.5) / 0.25, rtol=1e-5)
    (cls / "labels.csv").write_text("a0,0.5,-0.25\na1,0,0\na2,1,-1\n")
    reg = open_dataset(cls, "regression", channels=1)
    assert reg[0][0].shape == (1, 8, 8)
    np.testing.assert_allclose(reg[0][1], [0.5, -0.25])
    (cls / "labels.csv").write_text("a0,0\na1,9\na2,1\n")
    with pytest.raises(DenseError) as info:  # the file and the image, no per-pixel hint for classes
        open_dataset(cls, "classification", channels=3, num_classes=5)
    assert str(info.value) == f"{cls / 'labels.csv'}: image a1 has class 9, outside the model's 5 classes (0..4)"


BAD_DATA = {
    "npz without labels": ("npz", {"images": np.zeros((2, 3, 64, 64), np.float32)}, "no array 'labels'"),
    "class out of range": ("npz", {"images": np.zeros((2, 3, 64, 64), np.float32),
                                   "labels": np.full((2, 64, 64), 7)}, "has class 7, outside the model's 5 classes"),
    "label shape": ("npz", {"images": np.zeros((2, 3, 64, 64), np.float32), "labels": np.zeros((2, 32, 64), np.int64)},
                    "must be (N, 64, 64)"),
    "integer images": ("npz", {"images": np.zeros((2, 3, 64, 64), np.uint8), "labels": np.zeros((2, 64, 64), np.int64)},
                       "must be floating point"),
    "channels": ("npz", {"images": np.zeros((2, 4, 64, 64), np.float32), "labels": np.zeros((2, 64, 64), np.int64)},
                 "4 channel(s) but the model's input expects 3"),
    "no labels folder": ("folder-nolabels", None, "no 'labels' folder"),
    "label size": ("folder-labelsize", None, "label map is 60x64"),
    "sizes differ": ("folder-sizes", None, "different sizes"),
    "not data": ("file", None, "expected a data folder or an .npz"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_one_line(case, fcn_dense, tmp_path):
    kind, arrays, needle = BAD_DATA[case]
    if kind == "npz":
        data = tmp_path / "d.npz"
        np.savez(data, **arrays)
    elif kind == "folder-nolabels":
        data = _seg_folder(tmp_path / "d", n=1)
        for p in (data / "labels").iterdir():
            p.unlink()
        (data / "labels").rmdir()
    elif kind == "folder-labelsize":
        data = _seg_folder(tmp_path / "d", n=2, label_size=(60, 64))
    elif kind == "folder-sizes":
        data = _seg_folder(tmp_path / "d", n=2, size=[(64, 64), (72, 64)])
    else:
        data = tmp_path / "d.txt"
        data.write_text("hello")
    code, out, err = run("train", fcn_dense, "--task", "segmentation", "--data", data, "--steps", "1", "-b", "2", "-q",
                         "--checkpoint-dir", tmp_path / "ck")
    assert_clean_error(code, out, err, needle)


def test_regression_targets_must_be_in_tanh_range(vgg_dense):
    images = np.zeros((2, 3, 64, 64), np.float32)
    with pytest.raises(DenseError, match=r"scale them to \[-1, 1\]"):
        train(vgg_dense, task="regression", data=(images, np.array([3.0, 0.0])), steps=1, progress=False)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def test_sample_labels_reads_each_prediction_centre():
    # predictions every 4 pixels, receptive fields of 6 starting at -2: centres 0.5, 4.5, 8.5, ...
    geometry = Geometry(spatial_axes=(2, 3), stride=(4, 4), rf_start=(-2, -2), rf_size=(6, 6))
    labels = torch.arange(16 * 12).reshape(1, 16, 12)
    sampled = sample_labels(labels, (5, 3), geometry, ignore_index=-1)
    rows, cols = [0, 4, 8, 12, -1], [0, 4, 8]
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            expected = -1 if r < 0 else int(labels[0, r, c])
            assert int(sampled[0, i, j]) == expected


def test_upsample_places_predictions_at_their_centres():
    geometry = Geometry(spatial_axes=(2, 3), stride=(4, 4), rf_start=(0, 0), rf_size=(5, 5))  # centres 2, 6, 10
    ramp = torch.tensor([0.0, 4.0, 8.0]).reshape(1, 1, 1, 3).expand(1, 1, 3, 3)
    up = upsample_scores(ramp, (12, 12), geometry)
    # linear in x between centres, clamped outside: value = x - 2
    np.testing.assert_allclose(up[0, 0, 5].numpy(), np.clip(np.arange(12) - 2.0, 0, 8), atol=1e-5)


def test_classification_and_regression_average_the_dense_grid():
    out = torch.randn(2, 3, 4, 5)
    labels = torch.tensor([0, 2])
    loss = TaskLoss("classification")(out, labels)
    expected = torch.nn.functional.cross_entropy(out.mean(dim=(2, 3)), labels)
    assert torch.allclose(loss, expected)
    targets = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.5, -0.5]])
    loss = TaskLoss("regression")(out, targets)
    assert torch.allclose(loss, (torch.tanh(out.mean(dim=(2, 3))) - targets).abs().mean())


# ---------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------


def test_segmentation_training_lowers_the_loss(fcn_dense, tmp_path):
    rng = np.random.default_rng(1)
    images = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    labels = np.where(images[:, 0] > 0, 1, 3)  # a per-pixel rule the net can fit
    before = evaluate(fcn_dense, task="segmentation", data=(images, labels))
    seen = []

    def callback(step, loss, module):  # e.g. a validation curve
        assert module.training  # also after the evaluation at step 3
        if step == 3:
            seen.append(evaluate(module, task="segmentation", data=(images, labels))["loss"])

    result = train(fcn_dense, task="segmentation", data=(images, labels), steps=6, batch_size=2, lr=3e-3,
                   optimizer="adam", checkpoint_dir=tmp_path / "ck", checkpoint_every=3, progress=False,
                   callback=callback)
    assert len(seen) == 1
    after = evaluate(result.model, task="segmentation", data=(images, labels))
    assert after["loss"] < before["loss"]
    assert len(result.losses) == 6 and result.steps == 6
    assert {"pixel_accuracy", "mean_iou"} <= set(after)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["last.pt", "step-000003.pt", "step-000006.pt"]
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 6 and state["task"] == "segmentation"
    assert state["dense_model"].endswith("fcn_dense.onnx") and "onnx_dense" not in state["weights"]
    assert set(state["weights"]) == {i.name for i in onnx.load(fcn_dense).graph.initializer if i.data_type == 1}
    # resume: weights, optimiser and step count carry on to the total
    more = train(fcn_dense, task="segmentation", data=(images, labels), steps=8, batch_size=2, lr=3e-3,
                 optimizer="adam", resume=result.checkpoint, progress=False, label_mode="upsample")
    assert more.steps == 8 and len(more.losses) == 2


def test_no_progress_bar_off_a_terminal(fcn_dense, tmp_path, capfd):
    """train() from a script whose stderr is a log file writes no bar; progress=True still forces one."""
    rng = np.random.default_rng(2)
    images = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    labels = np.where(images[:, 0] > 0, 1, 3)
    train(fcn_dense, task="segmentation", data=(images, labels), steps=1, batch_size=2, checkpoint_dir=tmp_path / "a")
    assert "step" not in capfd.readouterr().err
    train(fcn_dense, task="segmentation", data=(images, labels), steps=1, batch_size=2, checkpoint_dir=tmp_path / "b",
          progress=True)
    assert "step" in capfd.readouterr().err


def test_classification_npz_and_trained_onnx(vgg_dense, tmp_path):
    rng = np.random.default_rng(2)
    data = tmp_path / "cls.npz"
    np.savez(data, images=rng.standard_normal((3, 3, 64, 64)).astype(np.float32), labels=np.array([1, 4, 9]))
    out = tmp_path / "trained.onnx"
    result = train(vgg_dense, task="classification", data=data, epochs=2, batch_size=2, lr=1e-2, out=out, progress=False)
    assert result.steps == 4  # 2 batches per epoch
    # the trained dense model runs in onnxruntime and agrees with the module
    import onnxruntime as ort

    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = predict(result.model, x, task="segmentation")  # the raw dense logits
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    logits = predict(str(out), x, task="classification")
    np.testing.assert_allclose(logits, ref.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)
    metrics = evaluate(str(out), task="classification", data=data)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["examples"] == 3


def test_evaluate_original_classifier_at_the_original_geometry(vgg_dense, fcn_dense, tmp_path_factory):
    """The documented call for an original model works when its output is (N, classes).

    VGG's Flatten+Gemm head gives the original one prediction per image; the rewrite made it
    spatial (the metadata's "inserted"), so the original's geometry is None: one prediction.
    """
    original = export_zoo(shared_root(tmp_path_factory), "vgg")
    assert geometry_from(vgg_dense, original=True) is None
    fcn_original = geometry_from(fcn_dense, original=True)  # a spatial output keeps its grid
    assert isinstance(fcn_original, Geometry) and fcn_original.stride != geometry_from(fcn_dense).stride
    rng = np.random.default_rng(4)
    images = rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
    labels = np.array([1, 4, 9])
    geometry = geometry_from(vgg_dense, original=True)
    metrics = evaluate(original, task="classification", data=(images, labels), geometry=geometry)
    assert metrics == evaluate(original, task="classification", data=(images, labels))
    assert metrics["examples"] == 3 and 0 <= metrics["accuracy"] <= 1
    import onnxruntime as ort

    session = ort.InferenceSession(original, providers=["CPUExecutionProvider"])
    ref = np.concatenate([session.run(None, {"input": images[i : i + 1]})[0] for i in range(3)])  # batch 1
    assert ref.shape == (3, 10)
    np.testing.assert_allclose(predict(original, images, task="classification", geometry=geometry), ref,
                               rtol=1e-4, atol=1e-5)
    assert evaluate(original, task="regression", data=(images, np.zeros((3, 10), np.float32)), geometry=geometry)["mae"] >= 0


def test_a_geometry_that_does_not_fit_the_output_is_refused(vgg_dense, tmp_path_factory):
    original = export_zoo(shared_root(tmp_path_factory), "vgg")
    images = np.zeros((2, 3, 64, 64), np.float32)
    dense_grid = geometry_from(vgg_dense)  # the dense grid, not the original's: axes 2, 3 of an (N, 10) output
    with pytest.raises(DenseError, match=r"output 'output' has shape \[1, 10\].*original=True") as err:
        evaluate(original, task="classification", data=(images, np.array([0, 1])), geometry=dense_grid)
    assert "\n" not in str(err.value)
    with pytest.raises(DenseError, match=r"output 'output' has shape \[2, 10\].*original=True"):
        predict(original, images, task="classification", geometry=dense_grid)
    with pytest.raises(DenseError, match=r"output 'output' has shape \[1, 10\]: one prediction per image"):
        evaluate(original, task="segmentation", data=(images, np.zeros((2, 64, 64), np.int64)))


def test_regression_on_a_1d_model(tmp_path_factory):
    src = export_zoo(shared_root(tmp_path_factory), "conv1d")
    dense = tmp_path_factory.mktemp("c1") / "conv1d_dense.onnx"
    onnx_dense.rewrite(src, dense, output_stride=2)
    rng = np.random.default_rng(3)
    images = rng.standard_normal((2, 4, 128)).astype(np.float32)
    targets = rng.uniform(-1, 1, (2, 5)).astype(np.float32)
    result = train(str(dense), task="regression", data=(images, targets), steps=2, batch_size=2, progress=False)
    assert np.isfinite(result.losses).all()
    assert evaluate(result.model, task="regression", data=(images, targets))["mae"] >= 0


def test_cli_train_folder(fcn_dense, tmp_path):
    data = _seg_folder(tmp_path / "data", n=2)
    out = tmp_path / "trained.onnx"
    code, stdout, stderr = run("train", fcn_dense, "--task", "segmentation", "--data", data, "--steps", "2", "-b", "2",
                               "--checkpoint-dir", tmp_path / "ck", "--out", out, "--lr", "0.01", "--label-mode", "upsample")
    assert code == 0, stderr
    assert "trained 2 steps" in stdout and "images/s" in stdout
    assert (tmp_path / "ck" / "last.pt").is_file() and out.is_file()
    before = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(fcn_dense).graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_cli_train_without_torch(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from onnx_dense.cli import main\n"
        "sys.exit(main(['train', 'model.onnx', '--task', 'classification', '--data', 'd']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "onnx-dense[torch]"' in lines[0], proc.stderr


def test_cuda_requested_without_cuda(fcn_dense):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(DenseError, match="CUDA is not available"):
        train(fcn_dense, task="segmentation", data=(np.zeros((1, 3, 64, 64), np.float32), np.zeros((1, 64, 64), int)),
              steps=1, device="cuda", progress=False)


def test_a_channels_last_model_trains_on_images_laid_out_as_it_reads_them(tmp_path):
    """A Keras model through tf2onnx reads (N, H, W, C) and writes its scores channels-last;
    the data is (N, C, H, W) and the losses read classes on axis 1. The trainer moves the
    channels where the model's metadata says they are, both ways: it trains (the loss falls),
    and predict gives the model's own scores, classes on axis 1."""
    import onnx_ir as ir
    import onnxruntime as ort

    from samples import foreign

    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(
        foreign.tf_segmenter(), output_stride=4, input_shapes={"input_1": (1, 48, 48, 3)}))
    rng = np.random.default_rng(0)
    images = rng.random((4, 3, 48, 48), dtype=np.float32)
    labels = (images[:, 0] > 0.5).astype(np.int64)
    result = train(dense, task="segmentation", data=(images, labels), steps=6, batch_size=2, lr=1e-2, progress=False)
    assert result.losses[-1] < result.losses[0], result.losses
    name = dense.graph.output[0].name
    want = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [name], {"input_1": images[:1].transpose(0, 2, 3, 1)})[0]
    got = predict(dense, images[:1], task="segmentation")
    np.testing.assert_allclose(got, np.moveaxis(want, 3, 1), rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # an original (or dpoa) has no metadata: its graph says where the channels are (past the
    # Rescaling's Mul and Sub, tf2onnx's Transpose to NCHW)
    original = foreign.tf_segmenter()
    scores = evaluate(original, task="segmentation", data=(images, labels), geometry=geometry_from(dense, original=True))
    assert scores["examples"] == 4 and np.isfinite(scores["loss"]), scores
