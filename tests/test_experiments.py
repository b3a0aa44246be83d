"""The experiments harness (samples/experiments.py) and its data (samples/shapes_data.py).

One tiny end-to-end run (config ``smoke``: 32x32 images, a few steps, one seed) goes through
every real code path: data generation, baseline training in plain torch, export, rewrite,
``onnx_dense.train.train`` for the control and the dense net, ``export_dpoa``, ``verify``,
``evaluate`` and the localisation with onnxruntime. It checks that the table and the JSON are
written and that every number is finite and in range; it does not (and must not) check that
dense or dpoa beat the baseline: at this size the numbers mean nothing.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from samples import experiments as ex
from samples import shapes_data as sd


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def test_segmentation_set_is_deterministic_and_prefix_stable():
    a = sd.segmentation_set(6, 32, seed=3)
    b = sd.segmentation_set(4, 32, seed=3)
    c = sd.segmentation_set(4, 32, seed=4)
    assert a["images"].shape == (6, 3, 32, 32) and a["images"].dtype == np.float32
    assert a["labels"].shape == (6, 32, 32) and a["labels"].dtype == np.int64
    np.testing.assert_array_equal(a["images"][:4], b["images"])
    np.testing.assert_array_equal(a["labels"][:4], b["labels"])
    assert not np.array_equal(a["images"][:4], c["images"])
    assert 0.0 <= a["images"].min() and a["images"].max() <= 1.0
    assert set(np.unique(a["labels"])) <= set(range(len(sd.CLASSES)))
    assert all((lab > 0).any() for lab in a["labels"])  # every image has an object


def test_object_set_annotations_agree():
    d = sd.object_set(8, 48, seed=1)
    assert list(d["classes"]) == [i % 4 for i in range(8)]
    lo, hi = 48 * 0.13, 48 * 0.34
    assert np.all((d["radius"] >= lo) & (d["radius"] <= hi))
    for mask, box in zip(d["masks"], d["boxes"]):
        ys, xs = np.nonzero(mask)
        assert tuple(box) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert 0 <= box[0] < box[2] <= 48 and 0 <= box[1] < box[3] <= 48


@pytest.mark.parametrize("kind", sd.OBJECT_CLASSES)
def test_shape_masks(kind):
    filled = sd.shape_mask(kind, 40, 20, 20, 12)
    outline = sd.shape_mask(kind, 40, 20, 20, 12, outline=2)
    assert filled.any() and outline.any()
    assert not np.any(outline & ~filled)  # the outline is part of the filled shape
    assert outline.sum() < filled.sum()
    assert filled[20, 20] and not outline[20, 20]


# --------------------------------------------------------------------------------------------
# localisation helpers
# --------------------------------------------------------------------------------------------


def test_largest_component_and_box():
    m = np.zeros((6, 6), bool)
    m[0, 0] = True
    m[2:4, 2:5] = True
    comp = ex.largest_component(m)
    assert comp.sum() == 6 and not comp[0, 0]
    s = np.zeros((4, 4))
    s[1:3, 2] = 5.0  # cells (1..2, 2) hot
    centres = 7.5 + 16 * np.arange(4)  # a stride-16 grid on a 64-pixel image
    assert ex.mask_box(s, centres, centres, 64) == (32, 16, 48, 48)
    dense = 7.5 + 4 * np.arange(13)  # the same image at stride 4: the border cells reach the border
    s = np.zeros((13, 13))
    s[0, 12] = 1.0
    assert ex.mask_box(s, dense, dense, 64) == (54, 0, 64, 10)
    assert ex.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------


def test_smoke_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "exp"
    assert ex.main(["--config", "smoke", "--seeds", "0", "--out", str(out), "--jobs", "1"]) == 0
    md = (out / "results.md").read_text()
    for task in ex.TASKS:
        assert f"| {task} |" in md
    assert "Wall time" in md and "python -m samples.experiments --config smoke" in md
    data = json.loads((out / "results.json").read_text())
    assert {r["task"] for r in data["runs"]} == set(ex.TASKS)
    bounds = {"seg": (0, 100), "cls": (0, 100), "loc": (0, 100), "reg": (0, 32 * (0.34 - 0.13))}
    for run in data["runs"]:
        expected = {"baseline", "dense"} if run["task"] == "loc" else set(ex.COLUMNS)
        assert expected <= set(run["metrics"]), run
        lo, hi = bounds[run["task"]]
        for name, value in run["metrics"].items():
            assert math.isfinite(value) and lo <= value <= hi, (run["task"], name, value)
        if run["task"] != "loc":
            # dpoa = the trained dense net sampled every eST (onnx_dense.verify, onnxruntime)
            assert run["dpoa"]["equivalent_to_trained_dense"], run["dpoa"]
            assert run["dpoa"]["changed"] > 0  # fine-tuning changed the weights written back
            assert run["dense"]["output_stride"] < run["dense"]["original_stride"]
    seg = next(r for r in data["runs"] if r["task"] == "seg")
    assert set(seg["at_centres"]) == set(ex.COLUMNS)
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in seg["at_centres"].values())
    assert data["summary"]["cls"]["baseline"]["values"] == [data["runs"][1]["metrics"]["baseline"]]
    assert data["wall_seconds"] > 0
    printed = capsys.readouterr().out
    assert "| task | metric |" in printed and "dense − control" in printed
    # --report re-renders the same table from results.json
    (out / "results.md").unlink()
    assert ex.main(["--out", str(out), "--report"]) == 0
    assert (out / "results.md").read_text() == md


def test_sets_can_be_drawn_in_chunks():
    whole = sd.object_set(6, 32, seed=5)
    part = sd.object_set(3, 32, seed=5, start=3)
    for key in ("images", "classes", "radius", "boxes"):
        np.testing.assert_array_equal(whole[key][3:], part[key])
    whole = sd.segmentation_set(5, 32, seed=5)
    part = sd.segmentation_set(2, 32, seed=5, start=3)
    np.testing.assert_array_equal(whole["labels"][3:], part["labels"])
