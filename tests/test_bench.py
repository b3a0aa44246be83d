"""``onnx-dense bench``: runs, reports, checks shift-and-stitch against dense; no timing assertions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

import onnx_dense
from onnx_dense import api, metadata
from onnx_dense.bench import bench, count_flops
from tests._cli import run

FCN = """
<ir_version: 9, opset_import: ["" : 20]>
fcn (float[1,3,48,48] input, float[8,3,3,3] w1, float[8] b1, float[8,8,3,3] w2, float[5,8,3,3] w3) => (float output) {
    c1 = Conv <pads = [1,1,1,1]> (input, w1, b1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r1)
    c2 = Conv <pads = [1,1,1,1]> (p1, w2)
    r2 = Relu (c2)
    p2 = MaxPool <kernel_shape = [3,3], strides = [2,2], pads = [1,1,1,1]> (r2)
    output = Conv (p2, w3)
}
"""

CLASSIFIER = """
<ir_version: 9, opset_import: ["" : 20]>
clf (float[1,3,16,16] input, float[4,3,3,3] w1, float[6,64] fc, float[6] fcb) => (float output) {
    c1 = Conv <pads = [1,1,1,1]> (input, w1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2,2], strides = [2,2]> (r1)
    p2 = MaxPool <kernel_shape = [2,2], strides = [2,2]> (p1)
    f = Flatten (p2)
    output = Gemm <transB = 1> (f, fc, fcb)
}
"""


def _model(text: str, seed: int = 0) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    graph = model.graph
    keep = list(graph.input[:1])
    for vi in graph.input[1:]:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(dims).astype(np.float32), vi.name))
    del graph.input[:]
    graph.input.extend(keep)
    for vi in graph.output:
        vi.type.tensor_type.ClearField("shape")
    return model


@pytest.fixture(scope="module")
def fcn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    original = folder / "fcn.onnx"
    onnx.save(_model(FCN), str(original))
    dense = folder / "fcn_dense.onnx"
    onnx_dense.rewrite(original, dense, output_stride=1)  # eST 4
    return str(original), str(dense)


def test_bench_reports_all_three(fcn):
    result = bench(*fcn, repeat=2, warmup=0, settle=0)
    names = [m.name for m in result.measurements]
    assert names == ["original", "dense", "shift-and-stitch"]
    assert result.est == [4, 4] and result.stitch_passes == 16
    o, d, s = result.measurements
    assert len(o.times_ms) == len(d.times_ms) == len(s.times_ms) == 2
    assert o.predictions == 10 * 10 and d.predictions > o.predictions and s.predictions == 16 * o.predictions
    assert s.flops == 16 * o.flops and d.flops > o.flops
    assert result.passed, result.text()
    text = result.text()
    assert "shift-and-stitch" in text and "time per FLOP" in text


def test_shift_and_stitch_equals_dense(fcn):
    """The stitched map equals the dense output on every phase away from the borders, not only phase 0."""
    result = bench(*fcn, repeat=1, warmup=0, settle=0)
    stitch = next(c for c in result.checks if c.check == "shift-and-stitch")
    subgrid = next(c for c in result.checks if c.check == "subgrid")
    assert stitch.passed and subgrid.passed
    assert stitch.compared > subgrid.compared  # phases other than 0 were compared
    assert stitch.max_rel < 1e-5
    assert stitch.border_max_abs is not None and stitch.border_max_abs > 0  # borders differ by design


def test_a_wrong_dense_model_fails_both_checks(fcn, tmp_path):
    dense = onnx.load(fcn[1])
    w = next(t for t in dense.graph.initializer if t.name == "w2")
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[0, 0, 1, 1] += 1.0
    w.CopyFrom(onnx.numpy_helper.from_array(arr, "w2"))
    broken = tmp_path / "broken.onnx"
    onnx.save(dense, str(broken))
    code, out, _ = run("bench", fcn[0], broken, "-n", "1", "--warmup", "0", "--settle", "0")
    assert code == 1
    assert "FAIL  output               subgrid" in out and "FAIL  output               shift-and-stitch" in out


def test_json_fields(fcn):
    code, out, err = run("bench", *fcn, "-n", "2", "--warmup", "0", "--settle", "0", "--json")
    assert code == 0, err
    data = json.loads(out)
    for name in ("original", "dense", "shift-and-stitch"):
        m = data["measurements"][name]
        assert {"median_ms", "min_ms", "times_ms", "predictions", "predictions_per_s", "flops", "passes"} <= set(m)
    assert set(data["ratios"]) == {
        "dense_over_original_time", "dense_over_original_flops", "time_per_flop", "stitch_over_dense_time"
    }
    assert set(data["targets"]) == {"stitch_over_dense", "time_per_flop"}
    assert all({"value", "target", "met"} <= set(t) for t in data["targets"].values())
    assert {c["check"] for c in data["checks"]} == {"subgrid", "shift-and-stitch"}
    assert data["passed"] is True and data["est"] == [4, 4] and data["stitch_passes"] == 16
    assert data["provider"] == "cpu" and data["threads"] == 2 and data["optimize"] is True
    assert data["prepass"] is True and data["settle_s"] == 0 and data["spinning"] is None
    assert {"min", "per_round_median", "cpu_median"} <= set(data["ratios_other_statistics"])
    assert {"cpu", "cores", "onnxruntime"} <= set(data["machine"])


def test_no_spin_is_recorded(fcn):
    code, out, err = run("bench", *fcn, "-n", "1", "--warmup", "0", "--settle", "0", "--no-stitch", "--no-spin", "--json")
    assert code == 0, err
    assert json.loads(out)["spinning"] is False
    code, out, err = run("bench", *fcn, "-n", "1", "--warmup", "0", "--settle", "0", "--no-stitch")
    assert code == 0, err
    assert "no spin-waiting" not in out
    assert "no spin-waiting" in bench(*fcn, repeat=1, warmup=0, settle=0, stitch=False, spinning=False).text()


def test_pause_comes_before_the_untimed_pass(fcn, monkeypatch):
    """The timed pass must follow its own untimed pass directly (threads awake, caches warm), not the pause."""
    import onnx_dense.bench.driver as bench_module
    from onnx_dense.runtime.session import OrtRunner

    events: list[str] = []
    real_call = OrtRunner.__call__
    monkeypatch.setattr(bench_module.time, "sleep", lambda s: events.append("pause"))
    monkeypatch.setattr(OrtRunner, "__call__", lambda self, *a, **k: (events.append("run"), real_call(self, *a, **k))[1])
    bench(*fcn, repeat=1, warmup=0, settle=0.05, stitch=False)
    # original then dense in round 1: pause, untimed pass, timed pass, for each
    assert events == ["pause", "run", "run", "pause", "run", "run"]


def test_flops_match_inspect(fcn):
    """The bench counts FLOPs on the graphs as run; at the static size they agree with inspect's totals."""
    original, dense = fcn
    inspection = api.inspect_model(original, output_stride=1)
    shapes = {"input": (1, 3, 48, 48)}
    assert count_flops(onnx.load(original), shapes)[0] == inspection.flops
    assert count_flops(onnx.load(dense), shapes)[0] == inspection.dense_flops


def test_classifier_head(tmp_path):
    """Flatten+Gemm: the original is one prediction per shift; at its size the dense map has one too."""
    original = tmp_path / "clf.onnx"
    onnx.save(_model(CLASSIFIER), str(original))
    dense = tmp_path / "clf_dense.onnx"
    onnx_dense.rewrite(original, dense, output_stride=2)
    result = bench(original, dense, repeat=1, warmup=0, settle=0)
    assert result.passed, result.text()
    assert result.est == [2, 2]
    o, d, s = result.measurements
    assert o.predictions == 1 and s.predictions == 4
    info = metadata.read(onnx.load(str(dense)))
    assert info.outputs["output"].inserted


def test_larger_input_runs_a_flexible_original(fcn):
    result = bench(*fcn, input_shapes={"input": (1, 3, 64, 64)}, repeat=1, warmup=0, settle=0)
    assert result.inputs == {"input": [1, 3, 64, 64]}
    assert result.passed, result.text()
    assert result.get("original").predictions == 14 * 14


def _clean_error(code, out, err, *needles):
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnx-dense: error: ") and "Traceback" not in err + out
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_exit_2(fcn, tmp_path):
    original, dense = fcn
    _clean_error(*run("bench", tmp_path / "missing.onnx", dense, "--json"), "missing.onnx", "no such file")
    _clean_error(*run("bench", original, original, "--json"), "no onnx_dense metadata")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    _clean_error(*run("bench", original, junk, "--json"), "junk.onnx")
    _clean_error(*run("bench", original, dense, "--repeat", "0", "--json"), "--repeat")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_absent_is_one_line(fcn):
    _clean_error(*run("bench", *fcn, "--provider", "cuda"), "provider 'cuda' is not available", "onnxruntime-gpu")


def test_classifier_at_another_size_is_one_line(tmp_path):
    original = tmp_path / "clf.onnx"
    onnx.save(_model(CLASSIFIER), str(original))
    dense = tmp_path / "clf_dense.onnx"
    onnx_dense.rewrite(original, dense, output_stride=2)
    code, out, err = run("bench", original, dense, "--input-shape", "input:1,3,32,32", "--json")
    _clean_error(code, out, err, "the original does not run at input input [1, 3, 32, 32]", "Gemm")


def test_profile_matches_nodes_by_name(tmp_path):
    model = _model(FCN)
    for i, node in enumerate(model.graph.node):
        node.name = f"{node.op_type.lower()}{i}"
    original = tmp_path / "named.onnx"
    onnx.save(model, str(original))
    dense = tmp_path / "named_dense.onnx"
    onnx_dense.rewrite(original, dense, output_stride=1)
    result = bench(original, dense, repeat=1, warmup=0, settle=0, stitch=False, profile=True)
    rows = {n.node: n for n in result.nodes}
    last = rows["conv6"]  # the last Conv: dilation 4 in the dense model
    assert last.op.startswith("Conv") and last.original_ms and last.dense_ms
    assert last.dense_flops > last.original_flops > 0 and last.efficiency is not None
    assert "per node" in result.text()
