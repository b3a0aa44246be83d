"""``onnx-dense run --engine ray``: the local run's bytes from Ray workers, through worker deaths and reruns.

One local Ray cluster (2 CPUs, so 2 workers) serves the whole module; every test compares the
files the Ray engine writes with those of the single-process run, byte for byte. The first two
tests need no Ray: the package and the other commands must not import it, and without it
``--engine ray`` is one line saying how to install it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
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
from onnx_dense.runtime import run_images
from tests._graphs import SEG
from tests._cli import assert_clean_error, run

pytestmark = pytest.mark.xdist_group("ray")  # one cluster for the module, on one xdist worker

ROOT = Path(__file__).resolve().parent.parent

TILE = 48


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dense model (output stride 2), four small images and one large one (many tiles of TILE)."""
    d = tmp_path_factory.mktemp("ray")
    model = onnx.parser.parse_model(SEG)
    rng = np.random.default_rng(0)
    for name, shape in {"w1": (8, 3, 3, 3), "w2": (4, 8, 3, 3)}.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.save(model, str(d / "model.onnx"))
    onnx_dense.rewrite(d / "model.onnx", d / "dense.onnx", output_stride=2)
    small = []
    for i, size in enumerate([(37, 45), (30, 24), (50, 50), (41, 33)]):
        path = d / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        small.append(str(path))
    big = d / "big.png"
    Image.fromarray(rng.integers(0, 256, (230, 197, 3), dtype=np.uint8)).save(big)
    return {"dense": str(d / "dense.onnx"), "small": small, "big": str(big), "dir": d}


@pytest.fixture(scope="module")
def reference(data):
    """What the single-process run writes: the small images whole, the large one tiled and whole."""
    d = data["dir"]
    run_images(data["dense"], data["small"], d / "ref", provider="cpu")
    run_images(data["dense"], [data["big"]], d / "ref_tiled", provider="cpu", tile=TILE)
    run_images(data["dense"], [data["big"]], d / "ref_whole", provider="cpu")
    return {"small": d / "ref", "tiled": d / "ref_tiled", "whole": d / "ref_whole"}


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def _ray_run(data, images, out, **kw):
    from onnx_dense.runtime import ray_engine

    return ray_engine.run_images(data["dense"], images, out, provider="cpu", workers=2, **kw)


# --------------------------------------------------------------------------------------------
# without Ray
# --------------------------------------------------------------------------------------------


def _python(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)


def test_ray_stays_optional(data, tmp_path):
    """The package and every other command run without importing ray; without it, --engine ray is one line."""
    proc = _python(f"""
        import sys
        import onnx_dense, onnx_dense.runtime
        from onnx_dense.cli import cli, main
        for name in sorted(cli.commands):
            assert main([name, "--help"]) == 0, name
        assert main(["run", {data['dense']!r}, {data['small'][0]!r}, "--out", "out", "-q"]) == 0
        loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
        assert not loaded, loaded
        sys.modules["ray"] = None  # as if not installed: `import ray` raises ImportError
        sys.exit(main(["run", {data['dense']!r}, {data['small'][0]!r}, "--out", "out2", "--engine", "ray"]))
    """, tmp_path)
    assert "AssertionError" not in proc.stderr, proc.stderr[-2000:]
    assert_clean_error(proc.returncode, proc.stdout, proc.stderr, "pip install 'onnx-dense[ray]'")
    assert (tmp_path / "out" / f"{Path(data['small'][0]).stem}.json").exists() and not (tmp_path / "out2").exists()


def test_ray_options_need_the_ray_engine(data, tmp_path):
    code, out, err = run("run", data["dense"], data["small"][0], "--out", tmp_path / "o", "--workers", "2")
    assert_clean_error(code, out, err, "--engine ray")


UPSAMPLED = """
<ir_version: 8, opset_import: ["" : 17]>
seg (float[1,3,32,32] input) => (float[1,4,32,32] output) <float[4] scales = {1.0, 1.0, 4.0, 4.0}> {
  score = Conv <strides=[4,4], pads=[1,1,1,1]> (input, w)
  output = Resize <mode="linear"> (score, , scales)
}
"""


def test_tiles_of_a_rebuilt_upsampling_are_refused_before_any_worker(data, tmp_path):
    """A worker's tile of a rebuilt final upsampling would interpolate at the tile's border:
    refused in one line (the local tiled run does it right), before a cluster starts."""
    pytest.importorskip("ray")
    model = onnx.parser.parse_model(UPSAMPLED)
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    onnx.save(model, tmp_path / "seg.onnx")
    onnx_dense.rewrite(tmp_path / "seg.onnx", tmp_path / "dense.onnx", output_stride=1)
    code, out, err = run("run", tmp_path / "dense.onnx", data["big"], "--out", tmp_path / "o", "--engine", "ray",
                         "--tile", "64")
    assert_clean_error(code, out, err, "output 'output' is a final upsampling rebuilt", "without --engine ray")
    assert not (tmp_path / "o").exists()
    code, out, err = run("run", tmp_path / "dense.onnx", data["big"], "--out", tmp_path / "local", "--tile", "64")
    assert code == 0, err


def test_an_address_nobody_answers_at_is_one_line(data, tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run("run", data["dense"], data["small"][0], "--out", tmp_path / "o", "--engine", "ray",
                         "--address", f"127.0.0.1:{port}")
    assert_clean_error(code, out, err, f"--address 127.0.0.1:{port}: no Ray cluster answers there")


# --------------------------------------------------------------------------------------------
# on a local Ray cluster
# --------------------------------------------------------------------------------------------


def test_same_bytes_as_the_single_process_run_and_bad_images_are_one_line(cluster, data, reference, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    out = tmp_path / "out"
    images = [*data["small"][:2], junk, tmp_path / "missing.png", *data["small"][2:]]
    code, stdout, stderr = run("run", data["dense"], *images, "--out", out, "--engine", "ray", "--workers", "2",
                               "--provider", "cpu")
    assert code == 2
    lines = sorted(stderr.strip().splitlines())
    assert "Traceback" not in stderr and len(lines) == 2, stderr
    assert lines[0].startswith(f"onnx-dense: error: {junk}: not an image"), lines
    assert lines[1] == f"onnx-dense: error: {tmp_path / 'missing.png'}: no such file", lines
    assert "wrote 4 of 6 images" in stdout and "(ray, 2 workers, cpu), 2 failed" in stdout
    assert _files(out) == _files(reference["small"])  # .npy, .png and .json, byte for byte


def test_one_large_image_tiled_across_workers_stitches_exactly_through_a_worker_death(
        cluster, data, reference, tmp_path, monkeypatch):
    from onnx_dense.runtime import ray_engine

    marker = tmp_path / "killed"
    monkeypatch.setenv(ray_engine.FAULT_ENV, f"{Path(data['big']).name}#3@{marker}")
    done = []
    summary = _ray_run(data, [data["big"]], tmp_path / "out", tile=TILE, on_progress=done.append)
    assert marker.exists()  # the worker running tile 3 killed itself; Ray restarted it and ran the tile again
    assert summary.ok
    assert len(done) > 8 and abs(sum(done) - 1) < 1e-9  # the image went out as many tiles
    assert _files(tmp_path / "out") == _files(reference["tiled"])  # no file lost, none extra, same bytes
    # and the stitched map is the untiled map
    assert np.array_equal(np.load(tmp_path / "out" / "big.output.npy"), np.load(reference["whole"] / "big.output.npy"))


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(cluster, data, reference, tmp_path, monkeypatch):
    from onnx_dense.runtime import ray_engine

    marker = tmp_path / "killed"
    monkeypatch.setenv(ray_engine.FAULT_ENV, f"{Path(data['small'][2]).name}@{marker}")
    summary = _ray_run(data, data["small"], tmp_path / "out")
    assert marker.exists()  # the worker did kill itself on that image
    assert summary.ok and len(summary.written) == len(data["small"])
    assert _files(tmp_path / "out") == _files(reference["small"])  # same names (no temporary or extra file), same bytes


def test_rerun_skips_finished_images(cluster, data, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, content in _files(reference["small"]).items():  # a first run that finished im0-im2 (same bytes)
        if not name.startswith("im3."):
            (out / name).write_bytes(content)
    (out / "im2.json").unlink()  # as if the run had died before im2's JSON, which is written last
    record = json.loads((out / "im0.json").read_text())  # and a JSON that names another image is not "done"
    (out / "im0.json").write_text(json.dumps(dict(record, image="elsewhere/im0.png")))
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("im1.*")}
    code, stdout, stderr = run("run", data["dense"], *data["small"], "--out", out, "--engine", "ray", "--workers", "2",
                               "--provider", "cpu")
    assert code == 0, stderr
    assert "wrote 3 of 4 images" in stdout and "1 done before" in stdout
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("im1.*")} == kept  # not rewritten
    assert _files(out) == _files(reference["small"])


@pytest.mark.slow
def test_an_image_that_always_kills_its_worker_fails_alone(cluster, data, reference, tmp_path, monkeypatch):
    from onnx_dense.runtime import ray_engine

    monkeypatch.setenv(ray_engine.FAULT_ENV, Path(data["small"][1]).name)  # no marker: every time
    summary = _ray_run(data, data["small"], tmp_path / "out")
    assert [image for image, _ in summary.failed] == [data["small"][1]]
    assert "died 4 times" in summary.failed[0][1]
    ref = _files(reference["small"])
    assert _files(tmp_path / "out") == {k: v for k, v in ref.items() if not k.startswith("im1.")}


WINDOW_TILE = 768


@pytest.fixture(scope="module")
def windowed_image(data):
    """A 3000x2000 image as a .npy (read by windows) and as a PNG, and the in-memory tiled run of the PNG."""
    d = data["dir"] / "windowed"
    (d / "png").mkdir(parents=True)
    (d / "npy").mkdir()
    pixels = np.random.default_rng(5).integers(0, 256, (3000, 2000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(d / "png" / "wide.png")
    np.save(d / "npy" / "wide.npy", pixels)
    run_images(data["dense"], [d / "png" / "wide.png"], d / "ref", provider="cpu", tile=WINDOW_TILE)
    return {"npy": d / "npy" / "wide.npy", "png": d / "png" / "wide.png", "ref": d / "ref"}


@pytest.mark.parametrize("shared", [True, False], ids=["workers-read-the-file", "driver-sends-pixels"])
def test_a_npy_image_is_read_by_windows_and_stitched_on_disk(cluster, data, windowed_image, tmp_path, monkeypatch,
                                                             shared):
    """Workers read their own windows from the path; where they cannot see the same file (another
    machine), the driver reads each window and sends its pixels. Same bytes either way."""
    from onnx_dense.runtime import ray_engine, windowed

    read = []
    real_window = windowed.NpyImage.window
    monkeypatch.setattr(windowed.NpyImage, "window", lambda self, index: read.append(index) or real_window(self, index))
    if not shared:  # as a worker on another machine sees it: not the driver's file
        monkeypatch.setattr(windowed, "signature", lambda path: (0, 0))
    out = tmp_path / "out"
    summary = ray_engine.run_images(data["dense"], [windowed_image["npy"]], out, provider="cpu", workers=2,
                                    tile=WINDOW_TILE)
    assert summary.ok, summary.failed
    assert (len(read) == 0) == shared  # the driver read no pixel when the workers could
    names = sorted(p.name for p in windowed_image["ref"].iterdir())
    assert sorted(p.name for p in out.iterdir()) == names  # no temporary file left behind
    for name in names:
        a, b = (windowed_image["ref"] / name).read_bytes(), (out / name).read_bytes()
        if name.endswith(".json"):
            a, b = json.loads(a), json.loads(b)
            assert a.pop("image") == str(windowed_image["png"]) and b.pop("image") == str(windowed_image["npy"])
        assert a == b, name


def test_a_budget_applies_to_each_worker_and_gives_the_local_bytes(cluster, data, reference, tmp_path):
    """--max-memory and --schedule with --engine ray: each worker's session takes them as the
    local one does (here: phases asked for, and the one phase of this model run whole, as the
    line per image says), and the files are the local run's, byte for byte."""
    out = tmp_path / "out"
    code, stdout, stderr = run("run", data["dense"], *data["small"], "--out", out, "--engine", "ray", "--workers",
                               "2", "--provider", "cpu", "--max-memory", "4GB", "--schedule", "phases")
    assert code == 0, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("onnx-dense: ")]
    assert len(lines) == len(data["small"]) and all("phases asked for" in line for line in lines), stderr
    local = tmp_path / "local"
    code, _, stderr = run("run", data["dense"], *data["small"], "--out", local, "--provider", "cpu",
                          "--max-memory", "4GB", "--schedule", "phases")
    assert code == 0, stderr
    ray_files, local_files = _files(out), _files(local)
    assert ray_files.keys() == local_files.keys()
    for name, data_ in ray_files.items():  # byte for byte but the estimate (it starts from each process's RSS)
        if name.endswith(".json"):
            a, b = json.loads(data_), json.loads(local_files[name])
            for record in (a, b):
                assert record["schedule"]["budget_bytes"] == 4 * 2**30 and "phases asked for" in record["schedule"]["instead"]
                record["schedule"].pop("estimate_bytes")
            assert a == b, name
        else:
            assert data_ == local_files[name], name
    for name in ray_files:  # the maps are the whole run's too
        if name.endswith(".npy"):
            assert np.array_equal(np.load(out / name), np.load(reference["small"] / name)), name
    code, _, err = run("run", data["dense"], data["small"][0], "--out", tmp_path / "bad", "--engine", "ray",
                       "--max-memory", "lots")
    assert_clean_error(code, _, err, "--max-memory 'lots'")
    assert not (tmp_path / "bad").exists()
