"""``onnx-dense run --tile`` on a .npy image: read window by window, outputs stitched on disk.

The files must be the bytes the in-memory tiled run writes for the same pixels given as a PNG
(the JSON differs only in the image's path), in every layout and dtype a .npy image may have;
and the driver's peak resident memory must stay far below the float32 image plus its outputs
(a child process runs a 6000x6000 image and reads its own VmHWM). The Ray engine's windowed
run is in tests/test_ray_engine.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from PIL import Image

import onnx_dense
from onnx_dense.runtime import run_images, windowed
from tests._graphs import SEG
from tests._cli import assert_clean_error, run

ROOT = Path(__file__).resolve().parent.parent

GRAY = SEG.replace("float[1,3,32,32]", "float[1,1,32,32]").replace("float[8,3,3,3]", "float[8,1,3,3]")


def _model(d: Path, text: str, name: str, in_channels: int) -> str:
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for w, shape in {"w1": (8, in_channels, 3, 3), "w2": (4, 8, 3, 3)}.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), w))
    onnx.save(model, str(d / f"{name}.onnx"))
    onnx_dense.rewrite(d / f"{name}.onnx", d / f"{name}.dense.onnx", output_stride=2)
    return str(d / f"{name}.dense.onnx")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("windowed")
    return {"rgb": _model(d, SEG, "rgb", 3), "gray": _model(d, GRAY, "gray", 1), "dir": d}


def _same_files(ref: Path, out: Path, ref_image: Path, image: Path) -> None:
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names  # no temporary file left, none missing
    for name in names:
        a, b = (ref / name).read_bytes(), (out / name).read_bytes()
        if name.endswith(".json"):
            a, b = json.loads(a), json.loads(b)
            assert a.pop("image") == str(ref_image) and b.pop("image") == str(image)
        assert a == b, name


def test_windowed_run_writes_the_in_memory_tiled_runs_bytes(models, tmp_path):
    """3000x2000: above batch.STREAM_PICTURES_ABOVE, so the picture is drawn band by band (small
    images' pictures, drawn whole, are compared in the layout tests below)."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (3000, 2000, 3), dtype=np.uint8)
    (tmp_path / "png").mkdir()
    (tmp_path / "npy").mkdir()
    png, npy = tmp_path / "png" / "im.png", tmp_path / "npy" / "im.npy"
    Image.fromarray(pixels).save(png)
    np.save(npy, pixels)
    before = npy.read_bytes()
    kw = dict(provider="cpu", tile=512, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    assert run_images(models["rgb"], [png], tmp_path / "ref", **kw).ok
    summary = run_images(models["rgb"], [npy], tmp_path / "out", **kw)
    assert summary.ok and summary.written[0].schedule.startswith("tiles, ")
    _same_files(tmp_path / "ref", tmp_path / "out", png, npy)
    assert npy.read_bytes() == before  # the input is never written
    # a rerun replaces the files in place, through the same temporary names
    assert run_images(models["rgb"], [npy], tmp_path / "out", **kw).ok
    _same_files(tmp_path / "ref", tmp_path / "out", png, npy)


@pytest.mark.parametrize("layout", ["hw-uint8", "chw-uint8", "hw1-uint16", "hw-float32", "1chw-float32", "1hwc-uint8"])
@pytest.mark.parametrize("model", ["rgb", "gray"])
def test_every_npy_layout_reads_as_pillow_reads_the_same_image(models, tmp_path, layout, model):
    """Windows of (H, W), (C, H, W), 16-bit and float arrays are the pixels load_image makes of the
    PNG/TIFF; so are a batch of one, (1, C, H, W) or (1, H, W, C), as a model's input is saved."""
    rng = np.random.default_rng(2)
    h, w = 97, 131
    if layout == "hw-uint8":
        array = rng.integers(0, 256, (h, w), dtype=np.uint8)
        picture = Image.fromarray(array, mode="L")
    elif layout == "chw-uint8":
        if model == "gray":
            pytest.skip("the same as hwc through Pillow's RGB -> L")
        hwc = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        array, picture = hwc.transpose(2, 0, 1).copy(), Image.fromarray(hwc)
    elif layout == "hw1-uint16":
        array = rng.integers(0, 65536, (h, w, 1), dtype=np.uint16)
        picture = Image.fromarray(array[..., 0])  # mode I;16
    elif layout == "1hwc-uint8":
        hwc = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        array, picture = hwc[None].copy(), Image.fromarray(hwc)
    elif layout == "1chw-float32":
        plane = rng.random((h, w), dtype=np.float32)
        array, picture = np.broadcast_to(plane, (1, 3 if model == "rgb" else 1, h, w)).copy(), Image.fromarray(plane, mode="F")
    else:
        array = rng.random((h, w), dtype=np.float32)
        picture = Image.fromarray(array, mode="F")
    ext = "tif" if picture.mode in ("F", "I;16") else "png"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref_image, image = tmp_path / "a" / f"im.{ext}", tmp_path / "b" / "im.npy"
    picture.save(ref_image)
    np.save(image, array)
    kw = dict(provider="cpu", tile=40)
    assert run_images(models[model], [ref_image], tmp_path / "ref", **kw).ok
    assert run_images(models[model], [image], tmp_path / "out", **kw).ok
    _same_files(tmp_path / "ref", tmp_path / "out", ref_image, image)


def test_untiled_npy_is_read_whole(models, tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "im.png")
    np.save(tmp_path / "b" / "im.npy", pixels)
    assert run_images(models["rgb"], [tmp_path / "a" / "im.png"], tmp_path / "ref", provider="cpu").ok
    assert run_images(models["rgb"], [tmp_path / "b" / "im.npy"], tmp_path / "out", provider="cpu").ok
    _same_files(tmp_path / "ref", tmp_path / "out", tmp_path / "a" / "im.png", tmp_path / "b" / "im.npy")


@pytest.mark.parametrize("array, args, needle", [
    (np.zeros((40, 40, 3), np.uint8), ["--size", "64"], "--size needs the whole image decoded"),
    (np.zeros((40, 40, 3), np.int32), [], "a .npy image of int32 values"),
    (np.zeros((40, 40, 5), np.uint8), [], "a .npy image of shape (40, 40, 5)"),
    (np.zeros((2, 3, 40, 40), np.float32), [], "a .npy image of shape (2, 3, 40, 40)"),
    (b"not an array", [], "not a .npy array numpy can read"),
])
def test_bad_npy_images_are_one_line(models, tmp_path, array, args, needle):
    image = tmp_path / "im.npy"
    if isinstance(array, bytes):
        image.write_bytes(array)
    else:
        np.save(image, array)
    code, out, err = run("run", models["rgb"], image, "--out", tmp_path / "out", "--tile", "40", *args)
    assert_clean_error(code, out, err, str(image), needle)
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no temporary file left behind


def test_release_keeps_what_was_written(tmp_path):
    """Pages given back from a shared file mapping keep their data: written values are read back."""
    array = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float32, shape=(512, 1024))
    array[:] = 7.0
    windowed.release(array)
    windowed.release(array[3:5])  # a view finds its mapping too
    assert float(array[500, 1000]) == 7.0 and float(array.sum()) == 7.0 * array.size
    array.flush()
    assert float(np.load(tmp_path / "a.npy").min()) == 7.0
    windowed.release(np.zeros(3))  # not a mapping: nothing to do


_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from onnx_dense.runtime import DenseSession, run_images  # imports first, so they are not counted

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

    model, image, warm, out, tile = sys.argv[2:]
    session = DenseSession(model, provider="cpu", tile=int(tile), threads=1)
    # onnxruntime's working memory for a tile (its arena grows over the first runs) is the tile's cost,
    # not the image's: a small image of the same tiles first
    assert run_images(model, [warm], out + "-warm", session=session).ok
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status("VmRSS")
    summary = run_images(model, [image], out, session=session)
    assert summary.ok, summary.failed
    print(json.dumps({"growth": status("VmHWM") - base}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_driver_peak_memory_is_bounded_by_a_tile_not_the_image(models, tmp_path):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the RSS high-water mark here")
    side, tile = 6000, 1024
    image, warm = tmp_path / "big.npy", tmp_path / "warm.npy"
    rng = np.random.default_rng(4)
    np.save(image, rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    np.save(warm, rng.integers(0, 256, (2 * tile + 100, 2 * tile + 100, 3), dtype=np.uint8))
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), models["rgb"], str(image), str(warm), str(tmp_path / "out"),
                           str(tile)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    float_image = side * side * 3 * 4
    outputs = np.load(tmp_path / "out" / "big.output.npy", mmap_mode="r").nbytes
    assert outputs == (side // 2) ** 2 * 4 * 4
    # the in-memory run holds at least the float32 image and the outputs (576 MB here)
    assert growth < (float_image + outputs) / 6, (  # 51 MB measured; in memory: 1.1 GB
        f"peak RSS grew by {growth / 1e6:.0f} MB for a {side}x{side} image "
        f"(float32 image {float_image / 1e6:.0f} MB, outputs {outputs / 1e6:.0f} MB)"
    )
