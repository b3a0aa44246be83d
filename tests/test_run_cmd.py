"""``onnx-dense run``: images in, .npy/.png/.json out, one line per bad image, inputs untouched."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from PIL import Image

import onnx_dense
from onnx_dense.runtime import DenseSession, load_image, run_images
from tests._graphs import SEG
from tests._cli import run

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


CLS = """
<ir_version: 9, opset_import: ["" : 20]>
cls (float[1,3,16,16] input) => (float[1,3] output) <float[4,3,3,3] w1, float[3,256] wf, float[3] bf> {
    c1 = Conv <pads = [1,1,1,1]> (input, w1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r1)
    f = Flatten (p1)
    output = Gemm <transB = 1> (f, wf, bf)
}
"""


def _dense(directory, text, shapes, stride):
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.save(model, str(directory / "model.onnx"))
    onnx_dense.rewrite(directory / "model.onnx", directory / "dense.onnx", output_stride=stride)
    return str(directory / "dense.onnx")


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    return _dense(tmp_path_factory.mktemp("seg"), SEG, {"w1": (8, 3, 3, 3), "w2": (4, 8, 3, 3)}, 2)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return _dense(tmp_path_factory.mktemp("cls"), CLS, {"w1": (4, 3, 3, 3), "wf": (3, 256), "bf": (3,)}, 1)


def _image(path, size=(37, 45), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else size
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return str(path)


def _digest(paths):
    return {str(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def test_run_writes_maps_pictures_and_grids(seg, tmp_path):
    a = _image(tmp_path / "a.png")
    b = _image(tmp_path / "b.jpg", size=(30, 24), mode="L", seed=1)
    before = _digest([a, b, seg])
    out = tmp_path / "out"
    code, stdout, stderr = run("run", seg, a, b, "--out", out, "--mean", "0.5", "--std", "0.25")
    assert code == 0, stderr
    assert "wrote 2 of 2 images" in stdout and stderr == ""
    assert sorted(p.name for p in out.iterdir()) == [
        "a.json", "a.output.labels.png", "a.output.npy", "a.output.png",
        "b.json", "b.output.labels.png", "b.output.npy", "b.output.png",
    ]
    assert _digest([a, b, seg]) == before  # inputs untouched
    # The map is the session's output on the same normalised image.
    array = np.load(out / "a.output.npy")
    image = load_image(a, mean=0.5, std=0.25)
    assert np.allclose(image.array, (np.asarray(Image.open(a), np.float32).transpose(2, 0, 1)[None] / 255 - 0.5) / 0.25)
    expected = DenseSession(seg, provider="cpu").run(image.array)["output"]
    assert np.array_equal(array, expected.numpy())
    record = json.loads((out / "a.json").read_text())
    assert record["image_size"] == [37, 45] and record["input_size"] == [37, 45]
    entry = record["outputs"]["output"]
    assert entry["shape"] == list(array.shape) and entry["view"] == "labels"
    assert entry["grid"]["stride"] == [2, 2] and entry["grid"]["shape"] == list(array.shape[2:])
    assert entry["grid"]["origin"] == list(expected.grid.origin)
    picture = Image.open(out / "a.output.png")  # for people: over the image, with a legend
    assert picture.mode in ("RGB", "RGBA") and picture.size[0] > 45 and picture.size[1] > 37
    assert entry["png"] == "a.output.png" and entry["labels_png"] == "a.output.labels.png"
    png = Image.open(out / "a.output.labels.png")  # for programs: pixel values are the classes
    assert png.mode == "P" and png.size == (45, 37)  # drawn at the size fed to the model
    labels = np.asarray(png)
    assert set(np.unique(labels)) <= set(range(4))
    # The pixel at a prediction's centre shows that prediction's argmax.
    iy, ix = 3, 5
    cy, cx = expected.grid.pixel((iy, ix))
    assert labels[int(cy), int(cx)] == np.argmax(array[0, :, iy, ix])


def test_bad_images_get_one_line_each_and_the_others_run(seg, tmp_path):
    good = _image(tmp_path / "good.png")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 this is not a jpeg")
    truncated = tmp_path / "cut.png"
    data = open(_image(tmp_path / "whole.png", size=(60, 60)), "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    folder = tmp_path / "folder"
    folder.mkdir()
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    code, stdout, stderr = run("run", seg, junk, good, truncated, folder, missing, "--out", out)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 4, stderr
    assert "Traceback" not in stderr + stdout
    for line, (name, what) in zip(lines, [("junk.jpg", "not an image"), ("cut.png", "cannot be decoded"),
                                           ("folder", "is a directory"), ("missing.png", "no such file")]):
        assert line.startswith("onnx-dense: error: ") and name in line and what in line, line
    assert "wrote 1 of 5 images" in stdout and "4 failed" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["good.json", "good.output.labels.png", "good.output.npy",
                                                     "good.output.png"]


def test_a_failed_write_is_one_line_and_leaves_no_file(seg, tmp_path, monkeypatch):
    """A full disk while writing one image's picture: that image fails in one line, nothing half-written."""
    from PIL import Image as PILImage

    first, second = _image(tmp_path / "first.png"), _image(tmp_path / "second.png")
    real_save = PILImage.Image.save
    calls = []

    def full_once(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", full_once)
    out = tmp_path / "out"
    code, stdout, stderr = run("run", seg, first, second, "--out", out)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr + stdout, stderr
    assert lines[0].startswith("onnx-dense: error: ") and "first.png" in lines[0] and "No space left" in lines[0]
    assert "wrote 1 of 2 images" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "first.output.npy", "second.json", "second.output.labels.png", "second.output.npy", "second.output.png"
    ]


def test_the_heatmap_is_drawn_once(classifier, tmp_path, monkeypatch):
    """run draws a heatmap with matplotlib only: the blended PIL heatmap is not built and thrown away."""
    from onnx_dense.runtime import images as imglib

    def no_second_drawing(values):
        raise AssertionError("images.colormap called: a heatmap drawn and not used")

    monkeypatch.setattr(imglib, "colormap", no_second_drawing)
    img = _image(tmp_path / "cat.png", size=(40, 52))
    code, _, stderr = run("run", classifier, img, "--out", tmp_path / "out", "--size", "30x36")
    assert code == 0, stderr
    assert json.loads((tmp_path / "out" / "cat.json").read_text())["outputs"]["output"]["view"] == "heatmap"


def test_classifier_gets_a_heatmap_over_the_image(classifier, tmp_path):
    img = _image(tmp_path / "cat.png", size=(40, 52))
    out = tmp_path / "out"
    code, _, stderr = run("run", classifier, img, "--out", out, "--size", "30x36")
    assert code == 0, stderr
    record = json.loads((out / "cat.json").read_text())
    entry = record["outputs"]["output"]
    assert record["input_size"] == [30, 36] and record["scale"] == [0.75, 36 / 52]
    assert entry["view"] == "heatmap" and entry["top_class"] in (0, 1, 2)
    logits = np.load(out / "cat.output.npy")
    assert logits.shape[:2] == (1, 3)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert entry["top_class"] == int(np.argmax(probs[0].reshape(3, -1).mean(axis=1)))
    png = Image.open(out / "cat.output.png")  # a figure: the image, the heat, a colour bar
    assert png.mode in ("RGB", "RGBA") and png.size[0] > 36 and png.size[1] > 30
    assert not (out / "cat.output.labels.png").exists()
    # --view labels draws the argmax instead; --view none writes no picture
    assert run("run", classifier, img, "--out", tmp_path / "o2", "--size", "30", "--view", "labels")[0] == 0
    assert Image.open(tmp_path / "o2" / "cat.output.labels.png").mode == "P"
    assert json.loads((tmp_path / "o2" / "cat.json").read_text())["input_size"] == [30, 39]  # shorter side 30
    assert run("run", classifier, img, "--out", tmp_path / "o3", "--view", "none")[0] == 0
    assert sorted(p.name for p in (tmp_path / "o3").iterdir()) == ["cat.json", "cat.output.npy"]


def test_image_smaller_than_the_model_needs(classifier, tmp_path):
    """Below one receptive field some onnxruntime kernels divide by zero: refused before running."""
    small = _image(tmp_path / "small.png", size=(10, 12))
    good = _image(tmp_path / "good.png", size=(20, 20))
    code, stdout, stderr = run("run", classifier, small, good, "--out", tmp_path / "out")
    assert code == 2 and "wrote 1 of 2 images" in stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "small.png" in lines[0] and "is 10x12 pixels" in lines[0] and "at least 16x16" in lines[0]


def test_tiled_run_writes_the_same_map(seg, tmp_path):
    img = _image(tmp_path / "big.png", size=(83, 97))
    assert run("run", seg, img, "--out", tmp_path / "whole", "-q")[0] == 0
    code, stdout, stderr = run("run", seg, img, "--out", tmp_path / "tiled", "--tile", "24x30")
    assert code == 0, stderr
    assert "tiled" in stdout
    whole = np.load(tmp_path / "whole" / "big.output.npy")
    tiled = np.load(tmp_path / "tiled" / "big.output.npy")
    assert np.array_equal(whole, tiled)
    assert json.loads((tmp_path / "tiled" / "big.json").read_text())["tile"] == [24, 30]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--size", "0"], ["--size '0'"]),
        (["--mean", "0.1,0.2"], ["--mean", "2 values", "3 input channels"]),
        (["--std", "0"], ["--std", "divide by zero"]),
        (["--tile", "3"], ["tile 3x3", "use at least"]),
        (["--nhwc", "--provider", "cpu"], ["nhwc"]),
    ],
    ids=["size", "mean", "std", "tile", "nhwc-cpu"],
)
def test_bad_options_are_one_line(seg, tmp_path, args, needles):
    img = _image(tmp_path / "a.png")
    code, stdout, stderr = run("run", seg, img, "--out", tmp_path / "out", *args)
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-dense: error: ") and "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_model_and_out(seg, tmp_path):
    img = _image(tmp_path / "a.png")
    code, _, stderr = run("run", tmp_path / "none.onnx", img, "--out", tmp_path / "out")
    assert code == 2 and "none.onnx: no such file" in stderr and len(stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = run("run", seg, img, "--out", blocker)
    assert code == 2 and "is not a directory" in stderr
    code, _, stderr = run("run", seg, "--out", tmp_path / "out")
    assert code == 2 and "IMAGES" in stderr  # click's own usage error


def test_never_writes_over_an_input(seg, tmp_path):
    a = _image(tmp_path / "a.png")
    victim = _image(tmp_path / "a.output.png", seed=3)  # what a.png's picture would be called
    before = _digest([a, victim])
    code, stdout, stderr = run("run", seg, a, victim, "--out", tmp_path)
    assert code == 2
    assert "a.png: would write" in stderr and "is an input file" in stderr
    assert _digest([a, victim]) == before
    assert (tmp_path / "a.output.output.png").exists()  # the other image still ran
    assert not list(tmp_path.glob(".*.tmp"))


def test_same_stems_do_not_collide(seg, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    one = _image(tmp_path / "x" / "pic.png")
    two = _image(tmp_path / "y" / "pic.png", seed=2)
    assert run("run", seg, one, two, "--out", tmp_path / "out", "-q")[0] == 0
    assert {p.name for p in (tmp_path / "out").glob("*.npy")} == {"pic.output.npy", "pic-2.output.npy"}
    assert json.loads((tmp_path / "out" / "pic-2.json").read_text())["image"] == two


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_cuda_asked_for_but_absent(seg, tmp_path):
    img = _image(tmp_path / "a.png")
    code, stdout, stderr = run("run", seg, img, "--out", tmp_path / "out", "--provider", "cuda")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "provider 'cuda'" in lines[0] and "onnxruntime-gpu" in lines[0]
    assert not (tmp_path / "out").exists()


def test_python_api_mirrors_the_cli(seg, tmp_path):
    a = _image(tmp_path / "a.png")
    errors = []
    summary = run_images(seg, [a, tmp_path / "nope.png"], tmp_path / "out", size="24x28", provider="cpu",
                         on_error=lambda image, message: errors.append(message))
    assert not summary.ok and summary.provider == "cpu"
    assert [r.image for r in summary.written] == [a]
    assert summary.failed == [(str(tmp_path / "nope.png"), f"{tmp_path / 'nope.png'}: no such file")] and len(errors) == 1
    assert summary.written[0].outputs["output"]["shape"][2:] == [12, 14]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a.json", "a.output.labels.png", "a.output.npy", "a.output.png"
    ]


def test_help_lists_run():
    code, stdout, _ = run("--help")
    assert code == 0 and "run" in stdout
    code, stdout, _ = run("run", "--help")
    assert code == 0 and "--tile" in stdout and "--provider" in stdout
