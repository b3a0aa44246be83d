"""Phase-by-phase runs (runtime/phases.py) and the schedule a memory budget picks (runtime/schedule.py).

Equality: on the CPU provider the phase schedule gives the whole-image outputs bit for bit
for both models here (the same kernels on maps of other sizes); the assertion allows fp32
round-off (1e-6 of the largest value), which is what a size-dependent kernel choice could add.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from PIL import Image

import onnx_dense
from onnx_dense import DenseError, metadata
from onnx_dense.runtime import DenseSession, dense_session, schedule
from onnx_dense.runtime.dense_session import DenseMap, PixelGrid


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The FCN sample at output stride 1 (eST 16: four split levels, receptive field 108) and a small
    ResNet with its classifier head at output stride 8 (eST 2 and 4, receptive field several hundred)."""
    pytest.importorskip("torch")
    from samples import export, zoo

    d = tmp_path_factory.mktemp("phases")
    export.export_onnx(zoo.build("fcn"), None, d / "fcn.onnx")
    onnx_dense.rewrite(d / "fcn.onnx", d / "fcn_dense.onnx", output_stride=1)
    export.export_onnx(zoo.build("resnet"), None, d / "resnet.onnx")
    onnx_dense.rewrite(d / "resnet.onnx", d / "resnet_dense.onnx", output_stride=8)
    return {"fcn": str(d / "fcn_dense.onnx"), "resnet": str(d / "resnet_dense.onnx")}


def _image(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, size, size), dtype=np.float32)


def _assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        a, b = got[name].numpy(), want[name].numpy()
        assert a.shape == b.shape, name
        scale = float(np.abs(b).max())
        assert np.abs(a - b).max() <= 1e-6 * scale, f"{name}: differs by {np.abs(a - b).max()} (max {scale})"


def test_metadata_records_the_est_of_dense_values(models):
    info = metadata.read(onnx.load(models["fcn"], load_external_data=False))
    levels = sorted({e for e, _ in info.values.values()})
    assert levels == [(2, 2), (4, 4), (8, 8), (16, 16)]
    assert all(axes == (2, 3) for _, axes in info.values.values())
    assert metadata.DenseInfo.from_json(info.to_json()) == info


@pytest.mark.parametrize("name,size", [("fcn", 70), ("fcn", 97), ("resnet", 90), ("resnet", 123)])
def test_every_split_depth_equals_the_whole_run(models, name, size):
    x = _image(size)
    whole = DenseSession(models[name], provider="cpu").run(x)
    session = DenseSession(models[name], provider="cpu", schedule="phases")
    for depth in range(1, session._max_depth() + 1):
        plan = session._phase_plan(depth)
        assert plan.depth == depth and session.session is None  # never two copies of the weights
        got = plan.run({session.image_input: x})
        _assert_same({k: DenseMap(k, v, None, None) for k, v in got.items()}, whole)


def test_phases_on_tiles_equal_the_whole_run(models, monkeypatch):
    x = _image(300, seed=1)
    whole = DenseSession(models["fcn"], provider="cpu").run(x)
    session = DenseSession(models["fcn"], provider="cpu", schedule="phases+tiles", max_memory="1MB")
    monkeypatch.setattr(dense_session, "_rss", lambda: 0)
    got = session.run(x)
    assert session.last_schedule.kind == "phases+tiles" and session.last_schedule.tiles > 1
    _assert_same(got, whole)


def test_the_budget_picks_the_fastest_schedule_that_fits(models, monkeypatch):
    """Estimates from shape inference; the process's own RSS is taken as 100 MB here."""
    monkeypatch.setattr(dense_session, "_rss", lambda: 100 * 2**20)
    feeds = {"input": _image(1024)}

    def chosen(budget):
        session = DenseSession(models["fcn"], provider="cpu", max_memory=budget)
        return session.choose(session._feeds(feeds))

    roomy, mid, tight, tiny = chosen("16GB"), chosen("700MB"), chosen("300MB"), chosen("150MB")
    assert roomy.kind == "whole" and roomy.estimate <= 16 * 2**30
    assert mid.kind == "phases" and mid.estimate <= 700 * 2**20 < roomy.estimate
    assert tight.kind in ("phases", "phases+tiles") and tight.estimate <= 300 * 2**20
    assert tight.estimate < mid.estimate
    assert tiny.kind == "phases+tiles" and tiny.tiles > 1
    assert "estimated peak" in tiny.describe() and "phases+tiles" in tiny.describe()
    # without a budget: as before, whole (or the tile asked for)
    plain = DenseSession(models["fcn"], provider="cpu")
    assert plain.choose(plain._feeds(feeds)).kind == "whole"
    assert plain.choose(plain._feeds(feeds), tile=256).kind == "tiles"


def test_what_cannot_be_split_falls_back_or_says_why(models, tmp_path):
    proto = onnx.load(models["fcn"])
    info = metadata.read(proto)
    old = metadata.DenseInfo(info.output_stride, info.strategy, info.inputs, info.outputs, info.source)
    for p in proto.metadata_props:
        if p.key == metadata.KEY:
            p.value = old.to_json()
    path = tmp_path / "old.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(DenseError, match="rewrite it again"):
        DenseSession(str(path), provider="cpu", schedule="phases").run(_image(64))
    session = DenseSession(str(path), provider="cpu", max_memory="1MB")
    session.run(_image(300))
    assert session.last_schedule.kind == "tiles"


def test_parse_memory():
    assert schedule.parse_memory("2GB") == 2 * 2**30
    assert schedule.parse_memory("1.5 g") == int(1.5 * 2**30)
    assert schedule.parse_memory("800MiB") == 800 * 2**20
    assert schedule.parse_memory(None) is None
    for bad in ("lots", "2XB", "0"):
        with pytest.raises(DenseError, match="--max-memory"):
            schedule.parse_memory(bad)


def test_streamed_picture_has_the_rendered_pixels(tmp_path, monkeypatch):
    from onnx_dense.runtime import images, picture_stream

    monkeypatch.setattr(picture_stream, "BAND_PIXELS", 300)  # many bands on a small picture
    rng = np.random.default_rng(0)
    image = images.ImageInput("x.png", np.zeros((1, 3, 37, 41), np.float32), (37, 41), (37, 41),
                              rng.integers(0, 255, (37, 41, 3), dtype=np.uint8))
    for classes, inserted, view in [(5, False, "labels"), (5, True, "heatmap"), (1, False, "heatmap"), (300, False, "labels")]:
        value = rng.standard_normal((1, classes, 10, 11)).astype(np.float32)
        info = metadata.DenseOutput("y", (2, 3), (4, 4), (4, 4), (16, 16), (7, 7), (-2, -2), inserted, "x",
                                    (3, 3), (10, 11))
        dense = DenseMap("y", value, PixelGrid.of(info, value.shape), info)
        want = images.render(dense, image, "auto")
        drawn = picture_stream.write_picture(tmp_path / "p.png", dense, image, "auto")
        assert drawn["view"] == want.view == view and drawn["top_class"] == want.top_class
        got = Image.open(tmp_path / "p.png")
        assert got.mode == want.image.mode
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want.image))
        if got.mode == "P":
            assert got.getpalette()[:768] == want.image.getpalette()[:768]


_PEAK_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from onnx_dense.runtime import DenseSession

    model, budget = sys.argv[1], sys.argv[2]
    x = np.random.default_rng(0).standard_normal((1, 3, 512, 512), dtype=np.float32)
    session = DenseSession(model, provider="cpu", **({"max_memory": budget} if budget != "-" else {}))
    out = session.run(x)
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    kind = session.last_schedule.kind
    print(json.dumps({"peak": peak, "kind": kind, "sum": float(out["output"].numpy().astype(np.float64).sum())}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_measured_peak_stays_within_the_budget(models):
    """FCN at output stride 1 on 512x512, each run in its own process: the whole run peaks above
    the budget, the budgeted run (phase by phase) below it, with the same output."""

    def child(budget: str) -> dict:
        env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, models["fcn"], budget],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    budget = 260 * 2**20
    whole, lean = child("-"), child(f"{budget}")
    assert whole["kind"] == "whole" and lean["kind"] in ("phases", "phases+tiles")
    assert lean["peak"] <= budget < whole["peak"], (lean, whole)
    assert lean["sum"] == whole["sum"]


def test_run_command_says_which_schedule_and_records_it(models, tmp_path, monkeypatch):
    from onnx_dense.runtime import batch
    from tests._cli import assert_clean_error, run

    monkeypatch.setattr(batch, "STREAM_PICTURES_ABOVE", 0)  # the banded picture writer on every image
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 100, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    code, out, err = run("run", models["fcn"], tmp_path / "a.png", "--out", tmp_path / "o", "--schedule", "phases")
    assert code == 0, err
    assert "a.png: phases, split at 1 eST level, 4 phases" in err  # no budget: the shallowest split
    record = json.loads((tmp_path / "o" / "a.json").read_text())
    assert record["schedule"]["kind"] == "phases" and record["schedule"]["depth"] == 1
    assert Image.open(tmp_path / "o" / "a.output.png").size == (100, 90)
    code, out, err = run("run", models["fcn"], tmp_path / "a.png", "--out", tmp_path / "o", "--max-memory", "lots")
    assert_clean_error(code, out, err, "--max-memory")
