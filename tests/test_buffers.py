"""Buffers shared by the runs of one stage (runtime/buffers.py), and which stage runs an
elementwise node (runtime/phases.py, POINTWISE).

Each test parses a tiny model from text and compares with onnxruntime itself, graph
optimisations off, so a fusion cannot hide a wrong binding or a wrong stage.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnx_dense.runtime import DenseSession, phases
from onnx_dense.runtime.buffers import Buffers, StageRunner
from tests import _graphs

_CONV_RELU = _graphs.graph(
    "float[1,3,H,W] x, float[4,3,3,3] w",
    "c = Conv <pads = [1, 1, 1, 1]> (x, w)\n y = Relu(c)\n z = Mul(y, y)",
    outputs="float[1,4,H,W] y, float[1,4,H,W] z",
)


def _phases_of(x: np.ndarray, f: int):
    return [x[..., p::f, q::f] for p in range(f) for q in range(f)]


def test_runs_with_buffers_equal_plain_runs_and_write_into_the_same_memory():
    session = _graphs.session(_CONV_RELU)
    plain, shared = StageRunner(session), StageRunner(session)
    x = np.random.default_rng(0).standard_normal((1, 3, 23, 18), dtype=np.float32)
    buffers = Buffers()
    seen = []
    for rnd in range(2):  # the second round: every shape known, every run bound
        for view in _phases_of(x, 3):  # 8 or 7 rows, 6 columns: two shapes, the largest first
            assert not view.flags.c_contiguous
            want = plain({"x": view})
            got = shared({"x": view}, buffers)
            for name in want:
                assert got[name].shape == want[name].shape
                assert np.array_equal(got[name], want[name]), name
            seen.append(got["z"])
    # the second round's runs all write into one buffer (the first phase's, the largest)
    assert all(np.shares_memory(seen[-1], z) for z in seen[len(seen) // 2:])
    # one buffer per input and output, the largest phase's size
    largest = x[..., 0::3, 0::3]
    assert buffers.nbytes == largest.nbytes + 2 * 4 * largest[0, 0].size * 4


def test_a_shape_not_seen_before_drops_the_old_outputs_before_onnxruntime_allocates():
    session = _graphs.session(_CONV_RELU)
    runner = StageRunner(session)
    buffers = Buffers()
    small = np.ones((1, 3, 4, 4), np.float32)
    runner({"x": small}, buffers)
    held = buffers.nbytes
    dropped = []
    original = buffers.drop
    buffers.drop = lambda kind: (dropped.append((kind, buffers.nbytes)), original(kind))
    runner({"x": np.ones((1, 3, 6, 6), np.float32)}, buffers)
    assert dropped == [("out", held)]  # contiguous input: bound as it is, no copy held
    assert buffers.nbytes == 2 * 4 * 36 * 4


def test_a_failed_run_says_which_shapes_through_the_callers_error():
    session = _graphs.session(_CONV_RELU)
    runner = StageRunner(session, on_error=lambda exc, feeds: ValueError(f"shapes {[v.shape for v in feeds.values()]}"))
    with pytest.raises(ValueError, match=r"\(1, 2, 4, 4\)"):
        runner({"x": np.ones((1, 2, 4, 4), np.float32)}, Buffers())


_STRIDED = _graphs.graph(
    "float[1,3,32,32] x, float[8,3,3,3] w1, float[8] s, float[8] b, float[8] m, float[8] var, float[8,8,3,3] w2",
    "c1 = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1)\n"
    " n1 = BatchNormalization(c1, s, b, m, var)\n r1 = Relu(n1)\n"
    " c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2)\n y = Relu(c2)",
    outputs="float y",
)


def test_elementwise_nodes_run_in_the_stage_that_makes_their_inputs(tmp_path):
    """BatchNormalization and Relu after the strided conv read a map of level 2, but only
    position by position: they run in stage 0 with the conv, which then hands on the Relu's
    output (one value, fused into the conv) instead of the conv's. The phases equal the whole."""
    dense = _graphs.rewrite(_STRIDED, output_stride=1)
    path = tmp_path / "dense.onnx"
    path.write_bytes(dense.SerializeToString())
    info = _graphs.info(dense)
    plan = phases.layout(dense, info, "x", 1)
    assert [n.op_type for n in plan.stages[0].nodes] == ["Conv", "BatchNormalization", "Relu"]
    assert [n.op_type for n in plan.stages[1].nodes] == ["Conv", "Relu"]
    assert plan.stages[0].outputs == ["r1"] and plan.stages[1].inputs == ["r1"]
    x = np.random.default_rng(1).standard_normal((1, 3, 29, 22), dtype=np.float32)
    want = _graphs.run(dense, {"x": x})["y"]
    session = DenseSession(str(path), provider="cpu", schedule="phases")
    got = session.run(x)["y"].numpy()
    assert session.last_schedule.kind == "phases"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("op", ["Floor(n1)", "Sign(n1)", "Dropout(n1)", "ThresholdedRelu <alpha = 0.1> (n1)",
                                "Where(k, n1, s4)"])
def test_every_elementwise_op_the_estimate_knows_runs_with_its_producer(tmp_path, op):
    """One list of position-by-position ops for the stage assignment and the estimate
    (schedule.ELEMENTWISE): these ran a stage late before, each reordered out of onnxruntime's
    blocked layout and back for a lone elementwise node. The phases equal the whole."""
    model = _graphs.graph(
        "float[1,3,32,32] x, float[8,3,3,3] w1, float[8,8,3,3] w2, bool[8,1,1] k, float[8,1,1] s4",
        "c1 = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1)\n n1 = Relu(c1)\n"
        f" r1 = {op}\n c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2)\n y = Relu(c2)",
        outputs="float y",
    )
    dense = _graphs.rewrite(model, output_stride=1)
    plan = phases.layout(dense, _graphs.info(dense), "x", 1)
    assert plan.stages[0].outputs == ["r1"], [n.op_type for n in plan.stages[1].nodes]
    path = tmp_path / "dense.onnx"
    path.write_bytes(dense.SerializeToString())
    x = np.random.default_rng(2).standard_normal((1, 3, 29, 22), dtype=np.float32)
    want = _graphs.run(dense, {"x": x})["y"]
    session = DenseSession(str(path), provider="cpu", schedule="phases")
    got = session.run(x)["y"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_an_elementwise_join_of_two_levels_stays_where_its_later_input_is_made():
    """Add(level-2 map made in stage 0, map made in stage 1) cannot run before stage 1."""
    model = _graphs.graph(
        "float[1,3,32,32] x, float[4,3,3,3] w1, float[4,4,3,3] w2",
        "c1 = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1)\n"
        " c2 = Conv <pads = [1, 1, 1, 1]> (c1, w2)\n y = Add(c1, c2)",
        outputs="float y",
    )
    dense = _graphs.rewrite(model, output_stride=1)
    plan = phases.layout(dense, _graphs.info(dense), "x", 1)
    assert [n.op_type for n in plan.stages[1].nodes] == ["Conv", "Add"]


def test_a_window_op_on_a_map_with_more_axes_divides_only_its_spatial_ones(tmp_path):
    """torch's LocalResponseNorm through the dynamo exporter: a 3-D AveragePool over (channels,
    H, W) of a 5-D view of the map, window 3x1x1. Its window axes are the tensor's 2, 3 and 4;
    only 3 and 4 are spatial, so only theirs are divided by the level (the phases refused it:
    "dilation 1 is not a multiple of 2", the channel window paired with the first level)."""
    model = _graphs.graph(
        "float[1,3,32,32] x, float[8,3,3,3] w1, float[8,8,3,3] w2",
        "c1 = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1)\n r1 = Relu(c1)\n"
        " one = Constant <value = int64[1] {1}> ()\n sq = Mul(r1, r1)\n v = Unsqueeze(sq, one)\n"
        " p = AveragePool <kernel_shape = [3, 1, 1], pads = [1, 0, 0, 1, 0, 0]> (v)\n"
        " b = Squeeze(p, one)\n d = Add(b, r1)\n c2 = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (d, w2)\n"
        " y = Relu(c2)",
        outputs="float y",
    )
    dense = _graphs.rewrite(model, output_stride=1)
    path = tmp_path / "dense.onnx"
    path.write_bytes(dense.SerializeToString())
    x = np.random.default_rng(3).standard_normal((1, 3, 29, 22), dtype=np.float32)
    want = _graphs.run(dense, {"x": x})["y"]
    for depth in (1, 2):
        phases.plan(dense, _graphs.info(dense), "x", depth)  # no refusal
    session = DenseSession(str(path), provider="cpu", schedule="phases")
    got = session.run(x)["y"].numpy()
    assert session.last_schedule.kind == "phases"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
