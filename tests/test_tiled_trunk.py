"""The tiled trunk: phases, with stage 0 (the original network before the first split) on tiles.

Its tiles overlap by the trunk's own receptive field (115 px for the ResNet here, against 600+
for the whole model), so at a budget where the image's first maps do not fit whole, it pays a
small halo on the cheapest part of the network instead of the whole model's. Equality with the
whole run is checked bit for bit on the CPU provider (1e-6 of the largest value allowed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

import onnx_dense
from onnx_dense import DenseError, metadata
from onnx_dense.runtime import DenseSession, dense_session, schedule
from onnx_dense.runtime.phases import layout
from tests._graphs import dense_zoo
from tests.test_phases import _assert_same  # the phase schedules' one equality


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("trunk")
    return {"resnet": dense_zoo(d, "resnet", 8), "mobilenet": dense_zoo(d, "mobilenetv2", 4, stem="mobilenet"), "dir": d}


def _image(h: int, w: int | None = None, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, h, w or h), dtype=np.float32)


def test_the_metadata_records_the_fields_of_the_maps_the_trunk_hands_on(models):
    """Stride and receptive field of a value, as recorded, are what its positions read: a
    position's field inside the image gives the same value whatever lies outside it."""
    proto = onnx.load(models["resnet"])
    info = metadata.read(proto)
    plan = layout(proto, info, "input", 1)
    axes = plan.trunk_axes(info)
    assert [a.name for a in axes] == plan.stages[0].outputs
    for out in axes:
        stride, start, size = info.fields[out.name]
        assert tuple(g.stride for g in out.geometry) == stride == (8, 8)  # the strides kept before the split
        assert all(r < 200 for r in size) and all(s < 0 for s in start)  # padded, and much smaller than the model's
    assert metadata.DenseInfo.from_json(info.to_json()) == info
    # measured: perturb the image outside the field of position (3, 4): that position stays
    from onnx import helper

    out = axes[0]
    g = out.geometry
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(helper.make_tensor_value_info(out.name, onnx.TensorProto.FLOAT, None))
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = _image(224)
    i, j = 3, 4
    y0, y1 = g[0].rf_start + i * g[0].stride, g[1].rf_start + j * g[1].stride
    inside = np.zeros_like(x, dtype=bool)
    inside[..., max(0, y0):y0 + g[0].rf_size, max(0, y1):y1 + g[1].rf_size] = True
    noisy = np.where(inside, x, _image(224, seed=9))
    a = sess.run([out.name], {"input": x})[0][..., i, j]
    b = sess.run([out.name], {"input": noisy})[0][..., i, j]
    np.testing.assert_array_equal(a, b)
    # and one pixel less of field would not be enough: the field's far corner matters
    corner = x.copy()
    corner[..., y0 + g[0].rf_size - 1, y1 + g[1].rf_size - 1] += 100
    c = sess.run([out.name], {"input": corner})[0][..., i, j]
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name,h,w,tile", [("resnet", 421, 389, 160), ("resnet", 300, 300, 232),
                                           ("mobilenet", 257, 330, 96)])
def test_a_tiled_trunk_equals_the_whole_run(models, name, h, w, tile):
    x = _image(h, w, seed=h)
    whole = DenseSession(models[name], provider="cpu").run(x)
    session = DenseSession(models[name], provider="cpu", schedule="phases")
    for depth in range(1, session._max_depth() + 1):
        plan = session._phase_plan(depth)
        axes = session._trunk_axes(depth)
        seen = []
        got = plan.run({"input": x}, trunk=lambda f: onnx_dense.runtime.tiling.run_tiled(
            plan.stages[0].run, f, "input", (2, 3), axes, (tile, tile), lambda d, n: seen.append(n)))
        assert seen and seen[0] > 1  # tiles did run
        _assert_same({k: dense_session.DenseMap(k, v, None, None) for k, v in got.items()}, whole)


def test_a_budget_too_small_for_the_first_maps_tiles_the_trunk_only(models, monkeypatch):
    """The ResNet at 1536 (the process's RSS taken as 0): whole is estimated at 67 MB, by phases
    61 MB (the trunk's first maps at full size); with 55 MB the trunk is tiled and later stages
    run on whole phase maps; the output is the whole run's and the estimate within the budget."""
    monkeypatch.setattr(dense_session, "_rss", lambda: 0)
    x = _image(1536, seed=3)
    session = DenseSession(models["resnet"], provider="cpu", max_memory="55MB")
    chosen = session.choose(session._feeds(x))
    assert chosen.kind == "tiled-trunk", chosen.describe()
    assert chosen.tiles > 1 and chosen.estimate <= 55 * 2**20
    assert "trunk in" in chosen.describe() and "of 55.00 MB allowed" in chosen.describe()
    got = session.run(x)
    assert session.last_schedule == chosen
    whole = DenseSession(models["resnet"], provider="cpu").run(x)
    _assert_same(got, whole)
    # what the whole-model tiles would have recomputed is more: the trunk's field is far smaller
    full_rf = max(max(o.rf_size) for o in session.info.outputs.values())
    trunk_rf = max(g.rf_size for o in session._trunk_axes(chosen.depth) for g in o.geometry)
    assert trunk_rf * 3 < full_rf


def test_the_estimate_of_a_tiled_trunk_counts_the_stitched_maps_and_one_tile(models):
    proto = onnx.load(models["resnet"])
    info = metadata.read(proto)
    plan = layout(proto, info, "input", 1)
    stages = plan.estimate_stages()
    prof = schedule.profile(proto, info, "input", (1024, 1024))
    whole_trunk = schedule.phases_peak(prof, stages, ["output"])
    small, large = (schedule.phases_peak(prof, stages, ["output"], trunk=prof.scaled((t, t))) for t in (256, 512))
    assert small < large < whole_trunk
    stitched = sum(prof.nbytes[n] for n in plan.stages[0].outputs)
    assert small > stitched  # the trunk's maps, stitched whole, are held while its tiles run


def test_schedule_tiled_trunk_is_refused_with_the_reason_where_the_trunk_cannot_tile(models, tmp_path):
    """A model written before the fields were recorded: one line naming what to do."""
    proto = onnx.load(models["resnet"])
    for p in proto.metadata_props:
        if p.key == metadata.KEY:
            data = json.loads(p.value)
            data.pop("fields")
            p.value = json.dumps(data)
    old = tmp_path / "old.onnx"
    onnx.save(proto, old)
    session = DenseSession(str(old), provider="cpu", schedule="tiled-trunk")
    with pytest.raises(DenseError, match="rewrite it again to tile its trunk"):
        session.run(_image(256))
    # the budget then takes what it can: phases, or phases on tiles
    budgeted = DenseSession(str(old), provider="cpu", max_memory="150MB")
    assert budgeted.choose(budgeted._feeds(_image(1536))).kind != "tiled-trunk"


def test_the_cli_runs_a_tiled_trunk_and_says_so(models, tmp_path):
    from tests._cli import run

    x = _image(400, seed=5)
    np.save(tmp_path / "x.npy", x[0])  # (C, H, W): run feeds it as is (mean 0, std 1)
    out = tmp_path / "out"
    code, _, err = run("run", models["resnet"], tmp_path / "x.npy", "--out", out, "--schedule", "tiled-trunk",
                       "--view", "none", "--provider", "cpu")
    assert code == 0, err
    assert "x.npy: tiled-trunk, trunk in" in err
    record = json.loads((out / "x.json").read_text())
    assert record["schedule"]["kind"] == "tiled-trunk" and record["schedule"]["tiles"] > 1
    whole = DenseSession(models["resnet"], provider="cpu").run(x)["output"].numpy()
    got = np.load(out / "x.output.npy").reshape(whole.shape)
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-6 * float(np.abs(whole).max()))


# ----------------------------------------------------------------- random layer chains

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_property import RESIDUAL_DOWNSAMPLE, MAXPOOL_PAD_AT_EST4, build, specs  # noqa: E402


def _dense_chain(spec, want: int) -> onnx.ModelProto:
    """A random chain rewritten to the output stride ``want`` picks among those it can reach."""
    import onnx_ir as ir

    from onnx_dense.api import output_strides, rewrite_model

    original = build(spec)
    reachable = output_strides(original)
    pick = reachable[want % len(reachable)]
    return ir.serde.serialize_model(rewrite_model(original, output_stride=pick[0] if len(pick) == 1 else pick))


def _chain_image(dense: onnx.ModelProto, info: metadata.DenseInfo, name: str, times: int, extra: int) -> np.ndarray:
    """A random image for ``dense``: ``times`` the rewrite's size plus ``extra`` along each spatial axis."""
    shape = [d.dim_value or 1 for d in dense.graph.input[0].type.tensor_type.shape.dim]
    entry = info.inputs[name]
    for a, s in zip(entry.spatial_axes, entry.size):
        shape[a] = times * s + extra
    return np.random.default_rng(extra).standard_normal(shape, dtype=np.float32)


def _assert_chain_maps_equal(got: dict, want: dict, context) -> None:
    """A random chain's maps against the whole run's: same shapes, NaN where the whole run has
    NaN (an AveragePool window wholly in the pads), else within 1e-5 of the largest value."""
    for name, m in want.items():
        a, b = got[name].numpy(), m.numpy()
        assert a.shape == b.shape and (np.isnan(a) == np.isnan(b)).all(), context
        a, b = np.nan_to_num(a), np.nan_to_num(b)
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(b).max())), context


def _trunk_equals_whole(spec, want: int, extra: int) -> bool:
    """Rewrite a random chain, tile its trunk at a size just above the least it allows, and
    compare with the whole run; False where the chain has no trunk to tile (nothing split)."""
    from onnx_dense.runtime import tiling

    dense = _dense_chain(spec, want)
    session = DenseSession(dense, provider="cpu", schedule="phases")
    try:
        depth = session._max_depth()
        axes = session._trunk_axes(depth) if depth else None
    except DenseError:
        return False
    if not depth:  # nothing split: no trunk
        return False
    name = session.image_input
    entry = session.info.inputs[name]
    # twice the rewrite's size: phase maps of its own size can be shorter than a window
    x = _chain_image(dense, session.info, name, 2, extra)
    need = [tiling.minimum_tile_anywhere([o.geometry[k] for o in axes]) for k in range(len(entry.spatial_axes))]
    tile = tuple(n + extra for n in need)
    plan = session._phase_plan(depth)
    got = plan.run({name: x}, trunk=lambda f: tiling.run_tiled(plan.stages[0].run, f, name, entry.spatial_axes,
                                                                axes, tile))
    whole = DenseSession(dense, provider="cpu").run(x)
    for out, want_map in whole.items():
        a, b = got[out], want_map.numpy()
        assert a.shape == b.shape, (out, tile, spec.text())
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(b).max())), (out, tile, spec.text())
    return True


@pytest.mark.parametrize("spec", [RESIDUAL_DOWNSAMPLE, MAXPOOL_PAD_AT_EST4], ids=["residual", "maxpool_pad_est4"])
def test_the_trunk_of_hand_picked_chains_tiles_exactly(spec):
    assert _trunk_equals_whole(spec, 1, 1)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(spec=specs(), want=st.integers(1, 32), extra=st.integers(0, 9))
def test_random_chains_tile_their_trunk_exactly(spec, want, extra):
    """The recorded fields of random layer chains (strides, pads, ceil-mode pools, joins, 1- to
    3-D) tile the trunk exactly, at tiles from the least each allows."""
    assume(_trunk_equals_whole(spec, want, extra))


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(spec=specs(), want=st.integers(1, 32), extra=st.integers(0, 40),
       kind=st.sampled_from(["phases", "tiled-trunk", "phases+tiles"]))
def test_random_chains_equal_the_whole_run_under_every_forced_schedule(spec, want, extra, kind):
    """From the rewrite's own size up, a forced schedule gives the whole run's output (or runs
    it whole where a stage is refused) or says before running why it cannot apply; an
    AveragePool window wholly in the pads gives NaN in both."""
    from onnx_dense.runtime import phases

    dense = _dense_chain(spec, want)
    whole = DenseSession(dense, provider="cpu")
    x = _chain_image(dense, whole.info, whole.image_input, 1, extra)
    try:
        want_maps = whole.run(x)
    except DenseError:  # a chain whose sizes agree only at its export size
        assume(False)
    session = DenseSession(dense, provider="cpu", schedule=kind)
    try:
        got = session.run(x)
    except DenseError as exc:
        assert not isinstance(exc, phases.StageRefused), exc
        assume(False)  # refused before running: what cannot be split or tiled
    _assert_chain_maps_equal(got, want_maps, (kind, session.last_schedule, spec.text()))


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(spec=specs(), want=st.integers(1, 32), extra=st.integers(0, 12), over=st.integers(0, 6))
def test_random_chains_equal_the_whole_run_on_plain_tiles_from_the_least_allowed(spec, want, extra, over):
    """Plain tiles (``tile=``) of the whole dense model, from the least tile the session allows:
    the stitched maps are the whole run's, or the tile is refused before any runs in one line
    (a node that stops tiles). This sweep (1,500 examples outside the suite) found three
    faults: a last tile shorter than a field (a prediction too many), tiles that could not be
    shortened to the image modulo the stride (onnxruntime refused a join), and the rewrite's
    join crops, refused, then with no dims after them."""
    dense = _dense_chain(spec, want)
    whole = DenseSession(dense, provider="cpu")
    x = _chain_image(dense, whole.info, whole.image_input, 1, extra)
    try:
        want_maps = whole.run(x)
        tile = tuple(t + over for t in whole.minimum_tile())
    except DenseError:  # a chain whose sizes agree only at its export size, or with no grid to tile
        assume(False)
    session = DenseSession(dense, provider="cpu", tile=tile)
    try:
        got = session.run(x)
    except DenseError as exc:
        assert "onnxruntime" not in str(exc), (tile, x.shape, spec.text())
        assume(False)  # refused before running
    _assert_chain_maps_equal(got, want_maps, (tile, x.shape, spec.text()))


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(spec=specs(), want=st.integers(1, 32), times=st.integers(2, 6), extra=st.integers(0, 12),
       fraction=st.floats(0.0, 1.2))
def test_random_chains_under_a_random_budget_equal_the_whole_run(spec, want, times, extra, fraction):
    """Whatever a budget picks (whole, phases, tiled trunk, phases on tiles, tiles, or the
    leanest when nothing fits) runs and gives the whole run's maps. The process's own memory
    is taken as 0 and the budget drawn between the smallest tiles' estimate and the whole
    run's, so that it decides."""
    dense = _dense_chain(spec, want)
    whole = DenseSession(dense, provider="cpu")
    x = _chain_image(dense, whole.info, whole.image_input, times, extra)
    try:
        want_maps = whole.run(x)
    except DenseError:
        assume(False)
    saved = dense_session._rss
    dense_session._rss = lambda: 0
    try:
        probe = DenseSession(dense, provider="cpu", max_memory="1TB")
        estimate = probe._estimator(probe._image_size({probe.image_input: x}))
        least = estimate(0, max(probe.minimum_tile()))  # about what the smallest tiles need
        budget = max(1, int(least + (estimate(0) - least) * fraction))
        session = DenseSession(dense, provider="cpu", max_memory=budget)
        got = session.run(x)
    finally:
        dense_session._rss = saved
    _assert_chain_maps_equal(got, want_maps, (session.last_schedule, spec.text()))


def test_a_stride_left_in_the_dense_region_is_refused_when_choosing_not_when_running(monkeypatch):
    """Found by the chains above: a stride kept after a removed one (here 1x2 after 2x2, at
    output stride 1x4) cannot be split into phases. The layout said yes and only building the
    stages said no, so a budgeted run chose phases and then failed; now the choice knows."""
    import onnx_ir as ir

    from onnx_dense.api import rewrite_model
    from tests.test_property import Layer, Spec

    def pool(op, s):
        return Layer(op, (1, 1), s, (0, 0, 0, 0), (1, 1), ceil_mode=1)

    spec = Spec(20, 1, (17, 17), (pool("AveragePool", (2, 2)), pool("MaxPool", (1, 2))), seed=0, taps=(0,))
    dense = ir.serde.serialize_model(rewrite_model(build(spec), output_stride=(1, 4)))
    x = _image(17)[:, :1]
    whole = DenseSession(dense, provider="cpu").run(x)
    session = DenseSession(dense, provider="cpu", max_memory="1MB")
    with pytest.raises(DenseError, match="strides \\[1, 2\\] in the dense region"):
        session._max_depth()
    monkeypatch.setattr(dense_session, "_rss", lambda: 0)
    got = session.run(x)
    assert "phases" not in session.last_schedule.kind and "trunk" not in session.last_schedule.kind
    _assert_same(got, whole)


_PEAK_CHILD = """
import json, sys
import numpy as np
from onnx_dense.runtime import DenseSession

x = np.random.default_rng(0).standard_normal((1, 3, 2048, 2048), dtype=np.float32)
session = DenseSession(sys.argv[1], provider="cpu", max_memory="64GB")
feeds = session._feeds(x)
phases = session.choose(feeds, schedule="phases")
session.max_memory = min(phases.estimate, session.choose(feeds).estimate) - 16 * 2**20  # whole and phases do not fit
chosen = session.choose(feeds)
out = session.run(x)
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"peak": peak, "budget": session.max_memory, "kind": chosen.kind, "tiles": chosen.tiles,
                  "sum": float(out["output"].numpy().astype(np.float64).sum())}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_measured_peak_of_a_tiled_trunk_stays_within_the_budget(models):
    """The ResNet at 2048 in its own process, its budget 16 MB under what whole or phases
    would need: the trunk is tiled, the peak (VmHWM) stays under the budget, the output is
    the whole run's."""
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, models["resnet"]], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["kind"] == "tiled-trunk" and got["tiles"] > 1, got
    assert got["peak"] <= got["budget"], got
    x = np.random.default_rng(0).standard_normal((1, 3, 2048, 2048), dtype=np.float32)
    whole = DenseSession(models["resnet"], provider="cpu").run(x)["output"].numpy().astype(np.float64).sum()
    assert abs(got["sum"] - whole) <= 1e-6 * max(1.0, abs(whole)), (got, whole)


def test_phases_of_an_image_too_small_for_them_run_it_whole_and_say_so():
    """Found by the chains above at the rewrite's own size: after a removed stride 2, a 4-wide
    window without pads leaves the dense map of a 7-pixel image one position, in phase 0;
    phase 1 has 3 positions, fewer than the window, and onnxruntime refuses it. Such an image
    is small enough to run whole: forced phases do that and say why; under a budget the whole
    run does not fit, the phase's error stands, in one line that says what to do."""
    import onnx_ir as ir

    from onnx_dense.api import rewrite_model
    from onnx_dense.runtime import phases
    from tests.test_property import Spec, _conv

    spec = Spec(20, 1, (7, 7), (_conv(1, 2, p=(0,) * 4, cout=1, relu=False), _conv(4, p=(0,) * 4, cout=1)), seed=0)
    dense = ir.serde.serialize_model(rewrite_model(build(spec), output_stride=1))
    x = _image(7)[:, :1]
    want = DenseSession(dense, provider="cpu").run(x)["output"].numpy()
    assert want.shape[-2:] == (1, 1)
    ran = []
    for kind in ("phases", "tiled-trunk", "phases+tiles"):
        session = DenseSession(dense, provider="cpu", schedule=kind)
        try:
            got = session.run(x)["output"].numpy()
        except DenseError as exc:  # a kind this chain cannot take says so before running
            assert not isinstance(exc, phases.StageRefused), (kind, exc)
            continue
        ran.append(kind)
        np.testing.assert_array_equal(got, want)
        assert session.last_schedule.kind == "whole", kind
        assert "refused a stage on a phase or tile of this image" in session.last_schedule.describe()
        assert session.last_schedule.to_dict()["instead"].startswith(kind)
        np.testing.assert_array_equal(session.run(x)["output"].numpy(), want)  # the whole run dropped the plan
        y = _image(9)[:, :1]  # large enough for every phase: phases again
        np.testing.assert_array_equal(session.run(y)["output"].numpy(),
                                      DenseSession(dense, provider="cpu").run(y)["output"].numpy())
        assert session.last_schedule.kind == kind and session.last_schedule.instead is None
    assert "phases" in ran, ran
    with pytest.raises(DenseError, match="a phase or tile this small can be shorter than a window.*run it whole"):
        DenseSession(dense, provider="cpu", schedule="phases", max_memory=1).run(x)


_SESSIONS_CHILD = """
import json, sys
import numpy as np, onnx, onnx_ir as ir
from onnx import helper
from onnx_dense import api
from onnx_dense.runtime import DenseSession, schedule

rng = np.random.default_rng(0)
inits, nodes, x = [], [], "x"
for i, (cin, cout, s) in enumerate([(8, 256, 2)] + [(256, 256, 1)] * 10):
    inits.append(onnx.numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32), f"w{i}"))
    nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], kernel_shape=[3, 3], strides=[s, s], pads=[1] * 4))
    nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
    x = f"r{i}"
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 8, 32, 32])],
                          [helper.make_tensor_value_info(x, 1, None)], inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
onnx.save(ir.serde.serialize_model(api.rewrite_model(model, output_stride=1)), sys.argv[1])  # loaded from a file, as run does

def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024

session = DenseSession(sys.argv[1], provider="cpu", max_memory="8GB", schedule="phases")
weights = session._weight_bytes()
before = rss()
session._phase_plan(1)
print(json.dumps({"grew": rss() - before, "counted": schedule.session_bytes(weights, stages=True), "weights": weights}))
"""


def test_stage_sessions_take_what_the_estimate_counts_for_them(tmp_path):
    """Measured on public trunks, building the stage sessions took 2.6-3.9x the weights (the
    model loaded with its weights, each stage's serialised model, onnxruntime's copies); the
    estimate counted 2x + 24 MiB, so a tiled trunk of ResNet-18-D at 1024 estimated at 358 MiB
    peaked at 380 under a 360 MB budget. Here 24 MB of weights, in a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _SESSIONS_CHILD, str(tmp_path / "dense.onnx")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["weights"] > 20 * 2**20
    assert got["grew"] <= got["counted"], got
