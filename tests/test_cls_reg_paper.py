"""The paper-protocol cls/reg runner (samples/cls_reg_paper.py) and the data it adds to shapes_data.

One tiny end-to-end run (config ``tiny``: 32x32 images, a few steps, one seed) goes through
every code path: the source net, the transfer, the baseline's fine-tuning on random crops,
export, rewrite, the control on crops and at full size, the dense net, ``export_dpoa``,
``verify``, ``evaluate``, the tables. It checks that the numbers are finite and in range and
the prediction grids are the ones the protocol needs (one prediction at the crop size, more at
the test size); it does not check who wins: at this size the numbers mean nothing.
"""

from __future__ import annotations

import json
import math

import numpy as np

from samples import cls_reg_paper as cp
from samples import shapes_data as sd


def test_source_shapes_and_aligned_objects():
    src = sd.object_set(8, 48, seed=1, kinds=sd.SOURCE_CLASSES)
    assert list(src["classes"]) == [i % 4 for i in range(8)]
    assert all(m.any() for m in src["masks"])
    for kind in sd.SOURCE_CLASSES:
        filled = sd.shape_mask(kind, 40, 20, 20, 12)
        assert filled.any() and filled.sum() < sd.shape_mask("circle", 40, 20, 20, 12.5).sum() + 1
    still = sd.object_set(6, 48, seed=2, centre_jitter=0)
    moved = sd.object_set(6, 48, seed=2, centre_jitter=6)
    anywhere = sd.object_set(6, 48, seed=2)
    # the same objects, only moved: radius and class shared; centred boxes symmetric about 23.5
    np.testing.assert_array_equal(still["radius"], moved["radius"])
    centres = (still["boxes"][:, :2] + still["boxes"][:, 2:]) / 2
    assert np.all(np.abs(centres - 24) <= 2.0)
    shift = (moved["boxes"][:, :2] + moved["boxes"][:, 2:]) / 2 - centres
    assert np.all(np.abs(shift) <= 6 + 2) and np.any(np.abs(shift) > 1)
    assert not np.array_equal(still["images"], anywhere["images"])


def test_tiny_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "exp"
    variants = "cls,cls-full,reg-j2,reg-any"
    assert cp.main(["--config", "tiny", "--seeds", "0", "--variants", variants, "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in data["runs"]] == variants.split(",")
    hi = {"cls": 100.0, "reg": 32 * (0.34 - 0.13)}
    for run in data["runs"]:
        expected = {"baseline", "control", "dense", "dpoa", "dense0"} | ({"control_full"} if run["variant"] == "cls" else set())
        assert set(run["metrics"]) == expected, run
        for name, value in run["metrics"].items():
            assert math.isfinite(value) and 0 <= value <= hi[run["task"]], (run["variant"], name, value)
        assert run["dpoa"]["equivalent_to_trained_dense"] and run["dpoa"]["changed"] > 0
        grids = run["predictions"]
        assert grids["baseline"] == [2, 2] and grids["dense"][0] > 2
        if run["variant"] == "cls":
            assert grids["baseline_at_crop"] == [1, 1]  # trained where it gives one prediction
    md = (out / "results.md").read_text()
    assert "| cls | accuracy" in md and "| reg-j2 | radius MAE" in md and "control at full size − " in md
    assert "Wall time" in md and "load average" in md
    assert "| variant | metric |" in capsys.readouterr().out
    (out / "results.md").unlink()
    assert cp.main(["--out", str(out), "--report"]) == 0
    assert (out / "results.md").read_text() == md
