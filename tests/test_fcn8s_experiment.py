"""samples/fcn8s_experiment.py end to end on a tiny config (32x32 images, a step per stage, one seed).

It goes through every real code path (FCN-32s from scratch, the FCN-16s/8s and dense-32s/16s/8s
chains through ``onnx_dense.train``, ``rewrite``, ``export_dpoa``, ``verify``, and the loss,
regime, upsampling and size ablations) and checks the structure of what it writes: every stage
is there, dpoa-8s is the untouched FCN-8s architecture with the same initializer names and
shapes, and the numbers are finite. It does not check who wins: at this size the numbers mean
nothing.
"""

from __future__ import annotations

import json
import math

import onnx
import pytest

from samples import fcn8s_experiment as fx

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fcn8s")
    assert fx.main(["--config", "tiny", "--seeds", "0", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_stage_and_ablation_is_reported(run):
    out, payload = run
    (r,) = payload["runs"]
    stages = {"fcn32s", "fcn16s", "fcn8s", "control", "dense32s", "dense16s", "dense8s", "dpoa32s", "dpoa16s", "dpoa8s"}
    assert set(r["metrics"]) == {"adam", "sgd"}  # the regime ablation
    for regime, metrics in r["metrics"].items():
        assert stages <= set(metrics), regime
    assert {"dense8s_T", "dpoa8s_T"} <= set(r["metrics"]["adam"])  # the loss ablation
    for k in ("fcn8s", "control", "dpoa8s", "dense8s"):
        assert set(r["upsampling"][k]) == {"model", "bilinear", "nearest", "learned", "at_centres"}
    assert set(r["size"]) == {"bin0", "bin1"}
    values = [v for m in r["metrics"].values() for v in m.values()]
    values += [v for m in r["upsampling"].values() for k, v in m.items() if k != "at_centres"]
    values += [v for m in r["size"].values() for v in m.values()]
    assert values and all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in values)
    assert r["score_map"]["original_stride"] == [8, 8] and r["score_map"]["dense_stride"] == [4, 4]
    md = (out / "results.md").read_text()
    for title in ("FCN-32s", "dense-16s", "dpoa-8s", "FCN-8s +K (control)", "Object size", "Upsampling"):
        assert title in md


def test_dpoa_is_the_untouched_fcn8s(run):
    out, payload = run
    (r,) = payload["runs"]
    assert r["dpoa_check"] and all(c["same_initializers"] and c["verify"] for c in r["dpoa_check"].values())
    for regime in ("adam", "sgd"):
        work = out / "models" / "seed0" / regime
        fcn8s, dpoa = onnx.load(str(work / "fcn8s.onnx")), onnx.load(str(work / "dpoa8s.onnx"))
        shapes = lambda m: [(i.name, list(i.dims)) for i in m.graph.initializer]  # noqa: E731
        assert shapes(dpoa) == shapes(fcn8s)
        assert [(n.op_type, list(n.input), list(n.output)) for n in dpoa.graph.node] == [
            (n.op_type, list(n.input), list(n.output)) for n in fcn8s.graph.node
        ]
        assert {i.name for i in fcn8s.graph.initializer} >= {"score_pool3.weight", "upscore_pool4.weight", "upscore8.weight"}
        # the weights did change: dpoa is dense-8s's, not FCN-8s's
        a = {i.name: onnx.numpy_helper.to_array(i) for i in fcn8s.graph.initializer}
        b = {i.name: onnx.numpy_helper.to_array(i) for i in dpoa.graph.initializer}
        assert any((a[k] != b[k]).any() for k in a)
        assert (a["upscore8.weight"] == b["upscore8.weight"]).all()  # the fixed bilinear kernel
