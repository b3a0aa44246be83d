"""Pictures (onnx_dense/pictures.py): what a reader needs is in them, not only pixels.

The figures are checked through matplotlib's objects (legend texts, colour-bar limits, titles,
cell values) before they are written, and once as PNG files through the commands.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from PIL import Image

from onnx_dense import pictures
from onnx_dense.bench import BenchResult, Check, Measurement
from onnx_dense.equivalence import Comparison, Report
from onnx_dense.runtime import DenseSession, load_image
from tests._cli import run
from tests.test_run_cmd import _image, classifier, seg  # noqa: F401  (fixtures)


def _texts(fig) -> str:
    out = []
    for ax in fig.axes:
        out.append(ax.get_title(loc="left"))
        out.extend(t.get_text() for t in ax.texts)
        legend = ax.get_legend()
        if legend is not None:
            out.extend(t.get_text() for t in legend.get_texts())
    out.extend(t.get_text() for t in fig.texts)
    return "\n".join(out)


def test_class_names_from_a_list_a_string_or_a_file(tmp_path):
    assert pictures.class_names(None, 2) == ["class 0", "class 1"]
    assert pictures.class_names("sky, road", 3) == ["sky", "road", "class 2"]
    names = tmp_path / "classes.txt"
    names.write_text("background\ncat\n\ndog\n")
    assert pictures.class_names(str(names), 3) == ["background", "cat", "dog"]
    assert pictures.class_names(["a", "b", "c"], 2) == ["a", "b"]


def test_label_map_is_over_the_image_with_a_legend_of_the_classes_present(seg, tmp_path):
    image = load_image(_image(tmp_path / "a.png"))
    with DenseSession(seg, provider="cpu") as session:
        out = session.run(image.array)["output"]
    fig = pictures.map_figure(out, image, "labels", "bg,road,car,sky")
    labels = np.argmax(out.numpy()[0], axis=0)
    text = _texts(fig)
    present = set(np.unique(labels[out.grid.nearest(np.arange(37), 0)[:, None], out.grid.nearest(np.arange(45), 1)]))
    names = ["bg", "road", "car", "sky"]
    for c in range(4):
        assert (f"{c} {names[c]} (" in text) == (c in present), text
    assert "argmax of 4 classes" in text and "one every 2 px" in text
    drawn = fig.axes[0].images[0].get_array()
    assert drawn.shape[:2] == (37, 45)  # at the size fed to the model, blended with it
    assert not np.array_equal(np.asarray(drawn), image.rgb)


def test_heatmap_range_is_the_maps_own_and_names_the_class(classifier, tmp_path):
    image = load_image(_image(tmp_path / "cat.png", size=(40, 52)))
    with DenseSession(classifier, provider="cpu") as session:
        out = session.run(image.array)["output"]
    fig = pictures.map_figure(out, image, "auto", ["cat", "dog", "bird"])
    logits = out.numpy()[0].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=0))
    probs /= probs.sum(axis=0)
    top = int(np.argmax(probs.reshape(3, -1).mean(axis=1)))
    heat = fig.axes[0].images[1]
    lo, hi = heat.get_clim()
    assert lo == pytest.approx(probs[top].min()) and hi == pytest.approx(probs[top].max())  # not 0 to 1
    assert hi - lo < 1
    colourbars = [ax for ax in fig.axes[1:]]
    assert colourbars, "no colour bar"
    text = _texts(fig)
    assert f"probability of {['cat', 'dog', 'bird'][top]!r} (class {top}" in text
    assert f"colours span {lo:.3g} to {hi:.3g}" in text


def test_verify_figure_shows_every_phase_and_marks_failures_and_gaps(tmp_path):
    c = [
        Comparison("out", "subgrid", True, max_abs=1e-7, compared=10, tolerance=1e-5),
        Comparison("out", "phase 0,1", False, max_abs=3e-3, compared=10, tolerance=1e-5),
        Comparison("out", "phase 1,1", True, max_abs=0.0, compared=10, tolerance=1e-5),
        Comparison("(weights)", "weights", True, note="3 weights shared by name, shape and value"),
        Comparison("cls", "phases", True, skipped=True, note="skipped: classifier head"),
    ]
    report = Report(c, 1e-5, 1e-6)
    fig = pictures.verify_figure(report, {"out": (2, 2), "cls": (2, 2)})
    ax = fig.axes[0]
    ratio = ax.images[1].get_array()
    assert ratio.shape == (2, 2)
    assert np.ma.is_masked(ratio[1, 0])  # phase 1,0 not checked: grey
    assert ratio[0, 1] == pytest.approx(300)
    assert [p.get_edgecolor()[:3] for p in ax.patches] == [(1.0, 0.0, 0.0)]  # the failing phase, outlined
    text = _texts(fig)
    assert "3 of 4 phases checked (1 grey: not checked)" in text and "worst 3.00e-03 (phase 0,1)" in text
    assert "FAILED" in text and "SKIP  cls phases" in text
    pictures.save(fig, tmp_path / "v.png")
    assert Image.open(tmp_path / "v.png").format == "PNG"


def test_bench_figure_has_a_bar_per_way_and_every_round():
    ms = [
        Measurement("original", 1, [1.0, 1.2, 1.1], 4, 100),
        Measurement("dense", 1, [2.0, 2.1, 1.9], 64, 170),
        Measurement("shift-and-stitch", 16, [30.0, 31.0, 29.0], 64, 1600),
    ]
    result = BenchResult(
        original_path="o.onnx", dense_path="d.onnx", provider="cpu", threads=2, optimize=True, warmup=1, repeat=3,
        prepass=True, settle=0.0, inputs={"input": [1, 3, 64, 64]},
        outputs=[{"name": "o", "est": [4, 4], "stride": [4, 4], "original_stride": [16, 16]}], est=[4, 4],
        measurements=ms, checks=[Check("o", "subgrid", True, 0, 0, 1, 4, 4)],
    )
    fig = pictures.bench_figure(result)
    ax = fig.axes[0]
    assert len(ax.patches) == 3 and ax.get_xscale() == "log"  # 30 ms beside 1 ms: log, or the others vanish
    dots = sum(len(line.get_xdata()) for line in ax.lines)
    assert dots == 9
    assert "median 1.10 ms" in _texts(fig) and "shift-and-stitch / dense" in _texts(fig)


def test_plots_from_the_commands(tmp_path):
    from tests.test_cli import _write

    net = _write(tmp_path / "net.onnx")
    dense = tmp_path / "dense.onnx"
    assert run("rewrite", net, dense, "-r", "2")[0] == 0
    code, out, err = run("verify", net, dense, "--phases", "--plot", tmp_path / "v.png")
    assert code == 0, err
    assert f"wrote {tmp_path / 'v.png'}" in out and Image.open(tmp_path / "v.png").size[0] > 200
    code, out, err = run("bench", net, dense, "--repeat", "2", "--settle", "0", "--plot", tmp_path / "b.png")
    assert code == 0, err
    assert Image.open(tmp_path / "b.png").format == "PNG"
    assert "round" not in err  # stderr is not a terminal: no progress lines in a log
    assert not list(tmp_path.glob(".*.tmp"))
    onnx.load(str(dense))  # untouched and loadable


def _traced_peak(function, *args) -> int:
    """Bytes at the peak of what ``function(*args)`` allocates (numpy's arrays included)."""
    import tracemalloc

    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("channels,axes,mean,std,dtype,mode", [
    (3, (2, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), np.float32, "RGB"),
    (3, (1, 2), (0.5,), (0.25,), np.float16, "L"),
    (1, (2, 3), (0.5,), (2.0,), np.float64, "RGB"),
    (3, (2, 3), (0.1,), (0.5,), np.float32, "I;16"),
])
def test_an_image_is_normalised_band_by_band_to_the_whole_formulas_values(tmp_path, monkeypatch, channels, axes,
                                                                           mean, std, dtype, mode):
    """Bands of 7 rows of 301: the same values as the formula on the whole image, bit for bit."""
    from onnx_dense.runtime import images as imglib

    monkeypatch.setattr(imglib, "BAND_VALUES", 7 * 203 * channels)
    rng = np.random.default_rng(3)
    if mode == "I;16":  # a 16-bit grey PNG, scaled by its bit depth
        raw = rng.integers(0, 65536, (301, 203), dtype=np.uint16)
        Image.fromarray(raw).save(tmp_path / "a.png")
        pixels = np.repeat((raw.astype(np.float32) / 65535.0)[..., None], 3, axis=2)
    else:
        Image.fromarray(rng.integers(0, 256, (301, 203, 3), dtype=np.uint8)).convert(mode).save(tmp_path / "a.png")
        with Image.open(tmp_path / "a.png") as img:
            pixels = np.asarray(img.convert("RGB" if channels == 3 else "L"), np.float32) / 255.0
    pixels = pixels if pixels.ndim == 3 else pixels[..., None]
    want = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    want = (want.transpose(2, 0, 1)[None] if axes == (2, 3) else want[None]).astype(dtype)
    image = load_image(tmp_path / "a.png", channels=channels, spatial_axes=axes, mean=mean, std=std, dtype=dtype)
    assert image.array.dtype == dtype and image.array.flags.c_contiguous
    assert np.array_equal(image.array, want)


@pytest.mark.parametrize("channels,axes,dtype,mode,suffix", [
    (3, (2, 3), np.float32, "RGB", ".png"),
    (3, (1, 2), np.float16, "L", ".png"),
    (1, (2, 3), np.float32, "RGB", ".png"),
    (3, (2, 3), np.float32, "I;16", ".png"),
    (3, (2, 3), np.float32, "RGB", ".npy"),
])
def test_an_image_read_by_windows_has_the_whole_inputs_values(tmp_path, channels, axes, dtype, mode, suffix):
    """``load_image(..., windows=True)``: no float input, a window of it computed on demand, bit
    for bit the whole input's ``[index]``; written into a given array too; ``np.asarray`` gives
    the whole input."""
    from onnx_dense.runtime import windowed

    rng = np.random.default_rng(4)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, (131, 97), dtype=np.uint16)).save(tmp_path / "a.png")
    elif suffix == ".npy":
        np.save(tmp_path / "a.npy", rng.integers(0, 256, (131, 97, 3), dtype=np.uint8))
    else:
        Image.fromarray(rng.integers(0, 256, (131, 97, 3), dtype=np.uint8)).convert(mode).save(tmp_path / "a.png")
    args = dict(channels=channels, spatial_axes=axes, mean=(0.4, 0.5, 0.6)[:channels], std=(0.2, 0.3, 0.25)[:channels],
                dtype=dtype)
    whole = load_image(tmp_path / f"a{suffix}", **args).array
    lazy = load_image(tmp_path / f"a{suffix}", windows=True, **args).array
    assert isinstance(lazy, windowed.WindowedInput) and not isinstance(lazy, np.ndarray)
    assert lazy.shape == whole.shape and lazy.dtype == whole.dtype and lazy.nbytes == whole.nbytes
    assert np.array_equal(np.asarray(lazy), whole)
    rows, cols = slice(17, 80), slice(None, 41)
    index = tuple(rows if a == axes[0] else cols if a == axes[1] else slice(None) for a in range(4))
    assert np.array_equal(lazy[index], whole[index])
    out = np.empty_like(whole[index])
    assert lazy.read(index, out) is out and np.array_equal(out, whole[index])
    channel = tuple(slice(0, 1) if a not in axes and a else s for a, s in enumerate(index))
    assert np.array_equal(lazy[channel], whole[channel])
    out = np.empty_like(whole[channel])
    assert lazy.read(channel, out) is out and np.array_equal(out, whole[channel])
    with pytest.raises(TypeError, match="slices of step 1"):
        lazy[:, :, ::2]


def test_reading_an_image_holds_its_array_and_8_bit_pixels_not_copies_of_the_array(tmp_path):
    """What Python allocates reading a 1200x1000 RGB PNG: the float32 array (4 bytes a value), the
    8-bit pixels kept for the pictures (1) and Pillow's buffers of the file (about 2): 1.84x the
    array, where the whole formula's temporaries took it to 3.25x (reading an 8000x8000 PNG
    peaked at 2,989 MiB of RSS for a 732 MiB array; 1,044 MiB now)."""
    rgb = np.random.default_rng(0).integers(0, 256, (1200, 1000, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    peak = _traced_peak(load_image, tmp_path / "big.png")
    assert peak < 2.2 * 4 * rgb.size, peak / (4 * rgb.size)


def test_label_maps_take_the_argmax_without_a_copy_of_the_scores(monkeypatch):
    """The labels of a many-class map are numpy's argmax over the classes (first of equal scores
    and first NaN included), taken a chunk of rows at a time: over the first axis numpy copies
    every score with that axis moved last, which was the largest part of ``onnx-dense run``'s
    peak under a budget (21 classes at 2048x2048: +352 MiB)."""
    from onnx_dense.runtime import images as imglib

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, (21, 300, 200)).astype(np.float32)  # many ties
    scores[4, 7, 9] = np.nan
    scores[2, 7, 9] = np.nan
    for chunk in (1, 1000, 21 * 200 * 7, 1 << 30):
        monkeypatch.setattr(imglib, "ARGMAX_CHUNK", chunk)
        np.testing.assert_array_equal(imglib.class_argmax(scores), np.argmax(scores, axis=0))
        view = np.moveaxis(rng.standard_normal((300, 200, 21)).astype(np.float32), 2, 0)  # NHWC scores
        np.testing.assert_array_equal(imglib.class_argmax(view), np.argmax(view, axis=0))
    monkeypatch.setattr(imglib, "ARGMAX_CHUNK", 1 << 16)
    peak = _traced_peak(imglib.class_argmax, scores)
    assert peak < scores.nbytes / 4, (peak, scores.nbytes)


def test_a_heatmap_takes_the_top_class_without_the_whole_maps_probabilities(monkeypatch):
    """A many-class map's heatmap is the probability of the class highest on average, a softmax
    over the classes (or the scores, already probabilities): the same class and the same map, to
    the bit, as from the whole map's probabilities, computed a chunk of rows at a time (the
    whole map's float64 probabilities and softmax's copies were several times the scores)."""
    from onnx_dense.runtime import images as imglib

    def whole(scores):  # the whole map's probabilities, as the pictures took them before
        s = scores.astype(np.float64)
        if not (s.min() >= 0 and s.max() <= 1 and np.allclose(s.sum(axis=0), 1, atol=1e-3)):
            e = np.exp(s - s.max(axis=0, keepdims=True))
            s = e / e.sum(axis=0, keepdims=True)
        top = int(np.argmax(s.reshape(len(s), -1).mean(axis=1)))
        return top, s[top]

    rng = np.random.default_rng(1)
    logits = rng.standard_normal((40, 90, 70)).astype(np.float32)
    logits[7] += 0.5  # a clear top class
    e = np.exp(logits - logits.max(axis=0))
    for scores in (logits, (e / e.sum(axis=0)).astype(np.float32), np.zeros((5, 30, 20), np.float32)):
        for chunk in (1, 40 * 70 * 3, 1 << 30):
            monkeypatch.setattr(imglib, "ARGMAX_CHUNK", chunk)
            top, heat = imglib.top_class_heat(scores)
            want_top, want_heat = whole(scores)
            assert top == want_top
            np.testing.assert_array_equal(heat, want_heat)
    monkeypatch.setattr(imglib, "ARGMAX_CHUNK", 1 << 14)
    peak = _traced_peak(imglib.top_class_heat, logits)
    assert peak < logits.nbytes, (peak, logits.nbytes)  # the whole map's probabilities: 2x, then copies
