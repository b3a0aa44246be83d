"""``fragments`` models run a first-level phase of their batch at a time (runtime/fragment_batches.py).

Equality is asked to fp32 round-off (1e-6 of the largest value), as in test_phases.py; on the
CPU provider every case here is equal bit for bit (the same kernels on a smaller batch).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import textwrap
import weakref

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import onnx_dense
from onnx_dense import DenseError, metadata
from onnx_dense.runtime import DenseSession
from onnx_dense.runtime import tiling
from onnx_dense.runtime.fragment_batches import BatchPlan
from tests._graphs import json_child
from tests.test_property import build as build_chain
from tests.test_property import specs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Segmentation samples that ``auto`` writes as fragments (upsampling inside the dense region;
    LR-ASPP's and DeepLabV3's global pooling; sizes baked at export taken at run time), and a classifier forced to fragments (an output
    with no spatial axes: one prediction per phase)."""
    pytest.importorskip("torch")
    from samples import export, segmentation, zoo

    d = tmp_path_factory.mktemp("batches")
    out = {}
    for name, stride in (("fcn8s", 1), ("lraspp", 2), ("deeplabv3", 2)):
        segmentation.export(segmentation.build(name).eval(), d / f"{name}.onnx")
        onnx_dense.rewrite(d / f"{name}.onnx", d / f"{name}_dense.onnx", output_stride=stride, rederive_sizes=True)
        out[name] = str(d / f"{name}_dense.onnx")
    export.export_onnx(zoo.build("resnet"), None, d / "resnet.onnx")
    onnx_dense.rewrite(d / "resnet.onnx", d / "resnet_dense.onnx", output_stride=8, strategy="fragments")
    out["resnet"] = str(d / "resnet_dense.onnx")
    return out


def _image(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, size, size), dtype=np.float32)


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        assert a.shape == b.shape, (name, a.shape, b.shape)
        same = (a == b) | (np.isnan(a) & np.isnan(b))  # a border window of lowest values is -inf in both
        finite = np.abs(b[np.isfinite(b)])
        scale = float(finite.max()) if finite.size else 0.0
        with np.errstate(invalid="ignore"):  # inf - inf where ``same`` already holds
            diff = float(np.where(same, 0, np.abs(a - b)).max()) if a.size else 0.0
        assert diff <= 1e-6 * scale, f"{name}: differs by {diff} (max {scale})"


def test_the_rewrite_records_where_the_batch_splits(models):
    for name, path in models.items():
        proto = onnx.load(path, load_external_data=False)
        info = metadata.read(proto)
        assert info.strategy == "fragments", name
        batches = info.batches
        assert "refused" not in batches, (name, batches)
        made = {o for node in proto.graph.node for o in node.output}
        for level in batches["levels"]:
            assert level["cuts"] and set(level["cuts"]) <= made
            assert level["factor"] == [2, 2]
        # every output but a final upsampling rebuilt on a score map (the session runs it on the whole map)
        assert set(batches["outputs"]) == {o for o, out in info.outputs.items() if out.upsampling is None}
        for spec in batches["outputs"].values():
            assert spec["phases"] in made and spec["levels"][0] == batches["levels"][0]["factor"]
        assert metadata.DenseInfo.from_json(info.to_json()) == info
        for level in batches["levels"]:  # the maps each level's moves read, with their fields
            assert level["sources"] and set(level["sources"]) <= made, (name, level)
            assert sorted(c for spec in level["sources"].values() for c in spec["cuts"]) == sorted(level["cuts"])
            for source, spec in level["sources"].items():
                assert spec["every"], (name, source)  # every sample's moves take every f-th position
                if source in info.fields:
                    assert tuple(map(tuple, (spec["stride"], spec["rf_start"], spec["rf_size"]))) == info.fields[source]


@pytest.mark.parametrize("name,sizes,depth", [("fcn8s", (64, 100), 3), ("lraspp", (64, 100), 2),
                                              ("deeplabv3", (64, 131), 2), ("resnet", (64, 100, 131), 2)])
def test_each_phase_of_each_level_alone_equals_the_whole_run(models, name, sizes, depth):
    for size in sizes:
        x = _image(size)
        whole = {k: v.numpy() for k, v in DenseSession(models[name], provider="cpu").run(x).items()}
        session = DenseSession(models[name], provider="cpu", schedule="phases")
        got = session.run(x)
        assert session.last_schedule.kind == "phases" and session.last_schedule.runs == 4
        _assert_same({k: v.numpy() for k, v in got.items()}, whole)
        body = session._split[0] if session._split else session  # a rebuilt final upsampling runs after
        assert isinstance(body._plan, BatchPlan) and body.session is None  # one copy of the weights
        assert body._max_depth() == depth
        for d in range(2, depth + 1):  # deeper splits: 4**d runs of the last stage
            plan = body._phase_plan(d)
            assert plan.depth == d and plan.splits == 4 ** d
            raw = plan.run(body._feeds(x))
            if body is session:
                _assert_same(raw, whole)
            else:  # the score maps the final upsampling reads
                _assert_same(raw, {k: v.numpy() for k, v in DenseSession(models[name], provider="cpu")
                                   ._body_and_tail()[0].run(x).items()})


def test_each_phases_share_of_a_tensor_of_phases_goes_once_the_phase_has_run(models, monkeypatch):
    """The moves done in numpy give one array per phase; a phase's goes before the levels below
    it run, so the deepest stage of phase 0 holds 3 of level 1's 4 arrays, not the whole map."""
    from onnx_dense.runtime import fragment_batches

    made = []
    real = fragment_batches._moved

    def moved(*args):
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(fragment_batches, "_moved", moved)
    body = DenseSession(models["fcn8s"], provider="cpu")._body_and_tail()[0]
    x = _image(100)
    whole = body.run(x)
    plan = body._phase_plan(3)
    assert plan.in_numpy == {0, 1, 2}
    deepest = plan.stages[-1]
    held = []
    run = deepest.run
    monkeypatch.setattr(deepest, "run", lambda feeds: (
        held.append([sum(p is not None for p in parts) for parts in made[:2]]), run(feeds))[1])
    _assert_same(plan.run(body._feeds(x)), {k: v.numpy() for k, v in whole.items()})
    assert held[0] == [3, 3] and held[-1] == [0, 0] and len(held) == 64
    assert all(p is None for parts in made for p in parts)
    # the estimate counts it: each level's stage frees its inputs' share
    how = [stage[4] for stage in plan.estimate_stages()]
    assert [sorted(h["freed"]) for h in how[1:]] == [sorted(plan.cuts[k]) for k in range(3)]


@pytest.mark.parametrize("name,sizes", [("fcn8s", (64, 100)), ("lraspp", (64, 131)), ("deeplabv3", (97, 131)),
                                        ("resnet", (197, 280))])
def test_the_trunk_before_the_first_moves_runs_on_tiles(models, name, sizes):
    """Level 1's moves read maps of the trunk, the original network at the kept strides: the trunk
    runs on tiles that overlap by its own field, the maps are stitched, and each phase takes its
    positions from them (no moves run). At every depth, the smallest trunk tiles and larger ones,
    sizes off the strides: the whole run's outputs."""
    for size in sizes:
        x = _image(size, seed=size)
        whole = {k: v.numpy() for k, v in DenseSession(models[name], provider="cpu").run(x).items()}
        session = DenseSession(models[name], provider="cpu")
        body = session._body_and_tail()[0] if session._rebuilt else session
        want = whole if body is session else {k: v.numpy() for k, v in body.run(x).items()}
        for depth in range(1, body._max_depth() + 1):
            plan = body._phase_plan(depth)
            assert plan.moves is True and plan.in_numpy == frozenset(range(depth)), (plan.moves, plan.in_numpy)
            assert plan.stages[0].outputs == list(plan.sources[0])  # the trunk hands on the maps alone
            trunk = body._trunk_axes(depth)
            least = tiling.minimum_tile_anywhere([g for o in trunk for g in o.geometry])
            for tile in (least, least + 7, 2 * least + 3):
                if len(tiling.plan_tiles(x.shape, (2, 3), trunk, (tile, tile))) == 1:
                    assert tile > least, "the smallest tiles cover the image at once: nothing tested"
                    continue
                got = plan.run(body._feeds(x), trunk=lambda f, t=tile: tiling.run_tiled(
                    plan.stages[0].run, f, body.image_input, (2, 3), trunk, (t, t)))
                _assert_same(got, {k: want[k] for k in got})
        forced = DenseSession(models[name], provider="cpu", schedule="tiled-trunk")
        got = forced.run(x)
        assert forced.last_schedule.kind == "tiled-trunk"
        _assert_same({k: v.numpy() for k, v in got.items()}, whole)


_WIDE_TRUNK = """
<ir_version: 9, opset_import: ["" : 17]>
net (float[1,3,64,64] x, float[16,3,3,3] w1, float[16,16,3,3] w2, float[4,16,3,3] w3, float[4,4,3,3] w4)
    => (float[1,4,32,32] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, w1)
  r1 = Relu (c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, w2)
  r2 = Relu (c2)
  c3 = Conv <strides=[2,2], pads=[1,1,1,1]> (r2, w3)
  r3 = Relu (c3)
  y = Conv <pads=[1,1,1,1]> (r3, w4)
}"""


def test_a_budget_between_the_split_and_the_tiled_trunk_takes_the_tiled_trunk(monkeypatch):
    """A trunk 16 channels wide at the image's size before a split into 4-channel phases: the
    trunk is the largest part of the split run, so a budget below the split's estimate and above
    the tiled trunk's is met by the tiled trunk, with the whole run's outputs."""
    from onnx_dense.runtime import dense_session
    from tests._graphs import build

    # Estimates start from the process's RSS, which other tests in this worker move between
    # two calls: held fixed, the estimates compared here are the same numbers the choice saw.
    monkeypatch.setattr(dense_session, "_rss", lambda: 300 * 2**20)

    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(build(_WIDE_TRUNK), output_stride=1,
                                                              strategy="fragments"))
    x = np.random.default_rng(5).standard_normal((1, 3, 600, 577), dtype=np.float32)
    probe = DenseSession(dense, provider="cpu", max_memory="1TB")
    size = (600, 577)
    estimate = probe._estimator(size)
    split = estimate(1)
    trunk = probe._choose_trunk(probe._feeds(x), size, range(1, 2), estimate, 0)  # the leanest
    assert trunk.estimate + 16 * 2**20 < split, (trunk.estimate, split)
    budgeted = DenseSession(dense, provider="cpu", max_memory=(trunk.estimate + split) // 2)
    got = budgeted.run(x)
    assert budgeted.last_schedule.kind == "tiled-trunk", budgeted.last_schedule.describe()
    assert budgeted.last_schedule.tiles > 1
    whole = DenseSession(dense, provider="cpu").run(x)
    _assert_same({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in whole.items()})
    # nothing fits: not the leanest (the smallest trunk tiles, thousands of them) but the fastest
    # within 5% of its peak above what the process holds
    tiny = DenseSession(dense, provider="cpu", max_memory="1MB")
    chosen = tiny.choose({"x": x})
    estimate = tiny._estimator(size)
    lean = tiny._choose_trunk(tiny._feeds(x), size, range(1, 2), estimate, 0)
    near = estimate.base + (lean.estimate - estimate.base) * 1.05
    assert chosen.kind == "tiled-trunk", chosen.describe()
    assert chosen.estimate <= near and chosen.tiles < lean.tiles / 10, (chosen.describe(), lean.tiles)
    assert "the fastest within 5% of the leanest's peak" in chosen.describe()


def test_memory_the_process_frees_while_choosing_does_not_change_the_choice(monkeypatch):
    """Found in CI: with nothing fitting, the choice is made again under the leanest's peak plus
    5%, and that second step used to measure the process's RSS afresh; another test's memory
    freed in between (53 MB) let the whole run through, 1.07x the leanest's peak. The second
    step now starts from the first step's RSS."""
    import itertools

    from onnx_dense.runtime import dense_session
    from tests._graphs import build

    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(build(_WIDE_TRUNK), output_stride=1,
                                                              strategy="fragments"))
    x = np.random.default_rng(5).standard_normal((1, 3, 600, 577), dtype=np.float32)
    monkeypatch.setattr(dense_session, "_rss", lambda: 300 * 2**20)
    want = DenseSession(dense, provider="cpu", max_memory="1MB").choose({"x": x})
    calls = itertools.count()
    monkeypatch.setattr(dense_session, "_rss", lambda: 4 * 2**30 - next(calls) * 100 * 2**20)  # freed as it goes
    got = DenseSession(dense, provider="cpu", max_memory="1MB").choose({"x": x})
    assert (got.kind, got.depth, got.tile) == (want.kind, want.depth, want.tile), (got.describe(), want.describe())


_CEIL_POOL = """
<ir_version: 9, opset_import: ["" : 17]>
net (float[1,2,40,40] x, float[4,2,3,3] w1, float[4,4,3,3] w2, float[3,4,3,3] w3) => (float[1,3,10,10] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, w1)
  r1 = Relu (c1)
  p1 = MaxPool <kernel_shape=[2,2], strides=[2,2], pads=[0,0,1,1]> (r1)
  c2 = Conv <pads=[1,1,1,1]> (p1, w2)
  r2 = Relu (c2)
  p2 = AveragePool <kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1]> (r2)
  y = Conv <pads=[1,1,1,1]> (p2, w3)
}"""


def test_moves_that_shift_copies_of_the_input_run_apart_from_the_trunk():
    """A pool whose end pad and the extension would reach its kernel is split by shifted copies of
    its padded input (passes/fragments.py, _split), not every f-th position of a map: its moves
    run as a stage of their own, on the
    stitched maps of the tiled trunk. A model written before the maps were recorded splits as
    before and says why its trunk does not tile."""
    from tests._graphs import build

    m = build(_CEIL_POOL)
    dense = ir.serde.serialize_model(onnx_dense.rewrite_model(m, output_stride=1, strategy="fragments"))
    levels = metadata.read(dense).batches["levels"]
    assert [spec["every"] for spec in levels[0]["sources"].values()] == [False]
    x = np.random.default_rng(3).standard_normal((1, 2, 53, 47), dtype=np.float32)
    whole = {k: v.numpy() for k, v in DenseSession(dense, provider="cpu").run({"x": x}).items()}
    session = DenseSession(dense, provider="cpu", schedule="tiled-trunk")
    for depth in range(1, session._max_depth() + 1):
        plan = session._phase_plan(depth)
        assert plan.moves is True and 0 not in plan.in_numpy and plan._first_level == 2
        assert all(n.op_type in ("Pad", "Slice", "Concat") or n.op_type == "Constant" for n in plan.stages[1].nodes)
        _assert_same(plan.run({"x": x}), whole)
    got = session.run({"x": x})
    assert session.last_schedule.kind == "tiled-trunk" and session.last_schedule.tiles > 1
    _assert_same({k: v.numpy() for k, v in got.items()}, whole)
    # written before: no maps recorded
    info = metadata.read(dense)
    batches = json.loads(json.dumps(info.batches))
    for level in batches["levels"]:
        del level["sources"]
    for p in dense.metadata_props:
        if p.key == metadata.KEY:
            p.value = dataclasses.replace(info, batches=batches).to_json()
    older = DenseSession(dense, provider="cpu", schedule="phases")
    _assert_same({k: v.numpy() for k, v in older.run({"x": x}).items()}, whole)
    assert older._phase_plan(1).moves.startswith("it was written before")
    forced = DenseSession(dense, provider="cpu", schedule="tiled-trunk")
    _assert_same({k: v.numpy() for k, v in forced.run({"x": x}).items()}, whole)
    assert forced.last_schedule.kind == "phases"
    assert forced.last_schedule.instead.startswith("tiled-trunk asked for, but cannot tile the trunk (the "
                                                   "trunk of this 'fragments' model ends in moves to the batch")
    assert "rewrite it again" in forced.last_schedule.instead


def test_a_batch_of_two_images_keeps_each_images_phases():
    """Phases sit next to the image batch (phase-major): a level's phase ``a`` is entries
    ``a*N .. a*N + N`` for N images, at every depth."""
    from tests._graphs import feeds_for, rewrite
    from tests.test_fragments import chain

    m = chain(21, batch=2)
    dense = rewrite(m, 1, strategy="fragments")
    x = feeds_for(m)["x"]
    whole = {k: v.numpy() for k, v in DenseSession(dense, provider="cpu").run({"x": x}).items()}
    session = DenseSession(dense, provider="cpu", schedule="phases")
    for depth in range(1, session._max_depth() + 1):
        _assert_same(session._phase_plan(depth).run({"x": x}), whole)
    assert session._max_depth() == 2 and whole["y"].shape[0] == 2


def test_the_batch_of_phases_is_split_where_the_budget_asks(models, monkeypatch):
    """A budget between the two estimates runs by phases, and says so; forced tiled schedules,
    which a fragments model cannot take, run by phases and say why."""
    from onnx_dense.runtime import dense_session

    monkeypatch.setattr(dense_session, "_rss", lambda: 300 * 2**20)  # the RSS other tests move, held
    x = _image(640)  # the two estimates ~130 MB apart
    whole = DenseSession(models["fcn8s"], provider="cpu").run(x)
    probe = DenseSession(models["fcn8s"], provider="cpu", max_memory="1TB")._body_and_tail()[0]  # the score map's
    estimate = probe._estimator((640, 640))
    lean, full = estimate(1), estimate(0)
    assert lean + 64 * 2**20 < full
    session = DenseSession(models["fcn8s"], provider="cpu", max_memory=(lean + full) // 2)
    got = session.run(x)
    assert session.last_schedule.kind == "phases", session.last_schedule.describe()
    assert session.last_schedule.runs in (4, 16)  # one level or two: the budget sits near the first's estimate
    _assert_same({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in whole.items()})
    for kind in ("tiled-trunk", "phases+tiles"):  # the trunk tiles; the rest is not tiled
        forced = DenseSession(models["fcn8s"], provider="cpu", schedule=kind)
        got = forced.run(x)
        assert forced.last_schedule.kind == "tiled-trunk", forced.last_schedule.describe()
        if kind == "phases+tiles":
            assert forced.last_schedule.instead.startswith(
                "phases+tiles asked for, but a 'fragments' model is tiled only before its first moves to the batch")
        _assert_same({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in whole.items()})


def test_the_run_command_splits_a_fragments_model_and_says_so(models, tmp_path):
    """``onnx-dense run --schedule phases`` on a segmentation head written as fragments: the
    line and the image's JSON give the split; the label map has the image's size."""
    from PIL import Image

    from tests._cli import run

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    code, out, err = run("run", models["lraspp"], tmp_path / "a.png", "--out", tmp_path / "o", "--schedule", "phases")
    assert code == 0, err
    assert "a.png: phases, split at 1 eST level, 4 phases" in err
    record = json.loads((tmp_path / "o" / "a.json").read_text())
    assert record["schedule"]["kind"] == "phases" and record["schedule"]["phases"] == 4
    assert Image.open(tmp_path / "o" / "a.output.labels.png").size == (128, 96)


def test_measured_peak_of_a_fragments_model_stays_within_the_budget(models):
    """DeepLabV3 sample at output stride 2 on 640x640, each run in its own process: the whole run
    peaks above the budget, the budgeted run (by phases of the batch) below it, same output."""

    whole = json_child(_PEAK_CHILD, models["deeplabv3"], "-")
    budget = int(whole["before"] + 0.8 * (whole["peak"] - whole["before"]))
    lean = json_child(_PEAK_CHILD, models["deeplabv3"], budget)
    assert whole["kind"] == "whole" and lean["kind"] == "phases", (lean, whole)
    assert lean["peak"] <= budget < whole["peak"], (lean, whole)
    assert lean["sum"] == whole["sum"]


_PEAK_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from onnx_dense.runtime import DenseSession
    from onnx_dense.runtime.dense_session import _rss

    model, budget = sys.argv[1], sys.argv[2]
    x = np.random.default_rng(0).standard_normal((1, 3, 640, 640), dtype=np.float32)
    session = DenseSession(model, provider="cpu", max_memory=None if budget == "-" else int(budget))
    before = _rss()
    out = session.run(x)
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    total = sum(float(v.numpy().astype(np.float64).sum()) for v in out.values())
    print(json.dumps({"peak": peak, "before": before, "kind": session.last_schedule.kind, "sum": total}))
    """
)


def test_the_estimate_counts_the_final_upsampling(models, monkeypatch):
    """The rebuilt final upsampling runs once, on the whole score map, after the rest: measured in
    a fresh process (DeepLabV3 sample at 1024), its peak is within its estimate; where that
    estimate is the larger, the schedule's line gives it and says whose it is."""
    r = json_child(_TAIL_CHILD, models["deeplabv3"], 1024, "1TB")
    assert r["before"] < r["peak"] <= r["estimate"] and r["runs"] == 1, r
    from onnx_dense.runtime import final_tail, schedule

    monkeypatch.setattr(schedule, "tail_parts", lambda *a, **k: (2**40, 0))
    monkeypatch.setattr(final_tail, "bands_of", lambda *a: "a reason")  # a tail that runs whole
    session = DenseSession(models["deeplabv3"], provider="cpu", max_memory="1GB")
    session.run(_image(64))
    line = session.last_schedule.describe()
    assert "(the final upsampling's, on the whole score map), over the 1.00 GB allowed" in line, line
    assert "the fastest for the rest, within the budget (the final upsampling runs whole: a reason)" in line, line
    assert session.last_schedule.to_dict()["estimate_of"] == "final upsampling"
    # a budget nothing fits: the rest need not be leaner than the final upsampling, so it runs
    # the fastest way within that peak (here: whole), not the leanest
    squeezed = DenseSession(models["deeplabv3"], provider="cpu", max_memory="1MB")
    got = squeezed.run(_image(64))
    line = squeezed.last_schedule.describe()
    assert squeezed.last_schedule.kind == "whole", line
    assert "over the 1.00 MB allowed: no schedule fits, this is the fastest for the rest within the final " \
           "upsampling's peak" in line, line
    whole = DenseSession(models["deeplabv3"], provider="cpu").run(_image(64))
    _assert_same({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in whole.items()})
    # the rest fits neither: its line gives the budget asked for, not the final upsampling's peak
    monkeypatch.setattr(schedule, "tail_parts", lambda *a, **k: (2**20, 0))
    squeezed = DenseSession(models["deeplabv3"], provider="cpu", max_memory="1MB")
    squeezed.run(_image(64))
    assert squeezed.last_schedule.budget == 2**20 and "over the 1.00 MB allowed" in squeezed.last_schedule.describe()


def test_a_final_upsampling_over_the_budget_runs_in_bands_within_its_estimate(models):
    """Where the whole final upsampling would exceed the budget, it runs on bands of the score
    map's rows (runtime/final_tail.py): DeepLabV3 at 1024 under a budget just above what the
    process holds, in a fresh process (its second image): several bands, the tail's peak within
    the banded estimate and below the whole tail's measured peak, the output the whole run's."""
    whole = json_child(_TAIL_CHILD, models["deeplabv3"], 1024, "1TB")
    # the budget: the body's outputs and the tail's outputs, with room for bands of 64 rows
    banded = json_child(_TAIL_CHILD, models["deeplabv3"], 1024, "tight")
    assert banded["runs"] > 2 and banded["bands"] == banded["runs"], banded
    assert banded["before"] < banded["peak"] <= banded["estimate"], banded
    assert banded["peak"] - banded["before"] < 0.85 * (whole["peak"] - whole["before"]), (banded, whole)
    assert banded["sum"] == whole["sum"] and banded["digest"] == whole["digest"]


_TAIL_CHILD = textwrap.dedent(
    """
    import hashlib, json, sys
    import numpy as np
    from onnx_dense.runtime import DenseSession, schedule as sched
    from onnx_dense.runtime.dense_session import _rss

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    model, size, budget = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    session = DenseSession(model, provider="cpu", max_memory="1TB")
    body, tail, parts = session._body_and_tail()
    if budget == "tight":  # an image before: the sessions made, as for every image after the first
        session.run(x)  # what the tail holds whatever its bands, and bands of about 64 rows
        prof = session._profile((size, size))
        nodes = [([i for i in n.input if i], [o for o in n.output if o], n.op_type) for n in parts.tail.graph.node]
        fixed, ort_bytes = sched.tail_parts(prof, nodes, body.output_names, parts.rebuilt)
        length = prof.shapes[parts.tail_inputs[0]][2]
        budget = _rss() + fixed + int(ort_bytes * sched.MARGIN * 90 / length)
    session.max_memory = body.max_memory = int(budget) if str(budget).isdigit() else 2**40
    seen = {"runs": 0}

    class Tail:  # the peak while the tail runs: the high-water mark reset just before it
        def run(self, names, feeds):
            if not seen["runs"]:
                seen["before"] = _rss()
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            out = tail.run(names, feeds)
            seen["peak"] = hwm()
            seen["runs"] += 1
            return out

    session._split = (body, Tail(), parts)
    plan = session._tail_plan({session.image_input: x}, body, parts)
    out = session.run(x)
    maps = out[parts.rebuilt[0]].numpy()
    print(json.dumps({"estimate": plan.estimate, "bands": session.last_schedule.tail_bands or 1,
                      "sum": float(maps.astype(np.float64).sum()), "digest": hashlib.sha1(maps.tobytes()).hexdigest(),
                      **seen}))
    """
)


def test_a_refusal_the_session_keeps_keeps_no_run_alive(models, monkeypatch):
    """Nothing fits 1 MB, so the session tries (and memoizes the refusal of) a tiled trunk: the
    refusal's traceback used to hold the run's frames, and with them its outputs, for as long
    as the session lived (400 MB at 4096 pixels). (The final upsampling goes unestimated, so
    that the rest runs under the 1 MB, not under the final upsampling's peak.)"""
    monkeypatch.setattr(DenseSession, "_tail_plan", lambda *a, **k: None)
    session = DenseSession(models["deeplabv3"], provider="cpu", max_memory="1MB")
    gc.disable()  # nor in a reference cycle, which only the collector would free, when it runs
    try:
        for _ in range(2):  # the first run keeps the refusal, the second raises it again
            out = session.run(_image(64))
            refs = [weakref.ref(m.numpy()) for m in out.values()]
            del out
            assert all(r() is None for r in refs)
    finally:
        gc.enable()
    assert any(isinstance(v, DenseError) for v in session._body_and_tail()[0]._profiles.values())


def _two_heads(tmp_path, scale: float) -> str:
    """Two removed strides; one head is the deep map, the other that map upsampled by ``scale``
    plus a skip from before the first stride (x4) or after it (x2): fragments at output stride 1."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from samples.export import export_onnx

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.one = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU())
            self.two = nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU())
            self.skip = nn.Conv2d(3 if scale == 4 else 4, 4, 3, 1, 1)

        def forward(self, x):
            first = self.one(x)
            deep = self.two(first)
            skip = self.skip(x if scale == 4 else first)
            return deep, nn.functional.interpolate(deep, scale_factor=scale, mode="nearest") + skip

    torch.manual_seed(0)
    export_onnx(TwoHeads().eval(), (1, 3, 32, 32), tmp_path / f"two{scale:g}.onnx")
    dense = tmp_path / f"two{scale:g}_dense.onnx"
    onnx_dense.rewrite(tmp_path / f"two{scale:g}.onnx", dense, output_stride=1, strategy="fragments")
    return str(dense)


def test_what_cannot_be_split_runs_whole_or_less_deep_and_says_why(tmp_path, models):
    """An upsampling back past a removed stride keeps only phase 0 of that level in one branch:
    the rewrite records the levels above it only, or why there are none; a run asked for phases
    splits that deep, or runs whole and says why."""
    x = _image(40)
    # x4 drops both levels: no split
    two = _two_heads(tmp_path, 4.0)
    info = metadata.read(onnx.load(two, load_external_data=False))
    assert "upsamples past the removed stride of level 1" in info.batches["refused"]
    whole = DenseSession(two, provider="cpu").run(x)
    forced = DenseSession(two, provider="cpu", schedule="phases")
    got = forced.run(x)
    assert forced.last_schedule.kind == "whole"
    assert "cannot split its batch of phases: node" in forced.last_schedule.instead
    _assert_same({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in whole.items()})
    # x2 drops the second level only: split one level deep
    two = _two_heads(tmp_path, 2.0)
    info = metadata.read(onnx.load(two, load_external_data=False))
    assert len(info.batches["levels"]) == 1 and max(len(o["levels"]) for o in info.batches["outputs"].values()) == 2
    whole = DenseSession(two, provider="cpu").run(x)
    forced = DenseSession(two, provider="cpu", schedule="phases")
    got = forced.run(x)
    assert forced.last_schedule.kind == "phases" and forced._max_depth() == 1
    _assert_same({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in whole.items()})
    # a fragments model written before the split was recorded: the same, asking for a rewrite
    proto = onnx.load(models["fcn8s"])
    info = metadata.read(proto)
    for p in proto.metadata_props:
        if p.key == metadata.KEY:
            p.value = dataclasses.replace(info, batches=None).to_json()
    older = DenseSession(proto, provider="cpu", schedule="phases")
    older.run(_image(64))
    assert older.last_schedule.kind == "whole" and "rewrite it again" in older.last_schedule.instead


@pytest.mark.parametrize("batches,why", [
    ([], "batches is not an object"),
    ({"refused": 3}, "refused is not a string"),
    ({"levels": [], "outputs": {}}, "levels is not a list"),
    ({"levels": [{"cuts": [], "factor": [2, 2]}], "outputs": {}}, "level 1 cuts is not a list"),
    ({"levels": [{"cuts": ["a"], "factor": [0, 2]}], "outputs": {}}, "level 1 factor is not a list of positive"),
    ({"levels": [{"cuts": ["a"], "factor": [2, 2]}, {"cuts": ["b"], "factor": [2]}], "outputs": {}},
     "level 2 factor has another number of axes"),
    ({"levels": [{"cuts": ["a"], "factor": [2, 2]}], "outputs": {"y": {"phases": "p", "levels": [[2, 2]], "axes": [2],
                                                                      "inserted": False}}}, "axes do not match"),
    ({"levels": [{"cuts": ["a"], "factor": [2, 2]}], "outputs": {"y": {"phases": "p", "levels": [[4, 4]],
                                                                      "axes": [2, 3], "inserted": False}}},
     "does not carry the levels split"),
])
def test_malformed_batches_in_the_metadata_are_refused(models, batches, why):
    info = metadata.read(onnx.load(models["fcn8s"], load_external_data=False))
    data = json.loads(info.to_json())
    data["batches"] = batches
    with pytest.raises(ValueError, match=why):
        metadata.DenseInfo.from_json(json.dumps(data))


# -------------------------------------------------------------------------------- random chains


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(spec=specs(), data=st.data())
def test_random_cnn_by_phases_of_its_batch_equals_the_whole_run(spec, data):
    """Random layer chains (test_property.py's), rewritten as fragments at a reachable stride: the
    batch run one phase of a level at a time, at every depth, gives the whole run's outputs."""
    original = build_chain(spec)
    reachable = onnx_dense.api.output_strides(original)
    stride = data.draw(st.sampled_from(reachable))
    try:
        dense = ir.serde.serialize_model(onnx_dense.api.rewrite_model(original, output_stride=stride,
                                                                      strategy="fragments"))
    except DenseError:
        assume(False)
    batches = metadata.read(dense).batches
    assume("refused" not in batches)
    name = dense.graph.input[0].name
    x = np.random.default_rng(0).standard_normal(
        [d.dim_value or 1 for d in original.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    whole = {k: v.numpy() for k, v in DenseSession(dense, provider="cpu").run({name: x}).items()}
    session = DenseSession(dense, provider="cpu", schedule="phases")
    got = session.run({name: x})
    assert session.last_schedule.kind == "phases", session.last_schedule.describe()
    levels = batches["levels"]
    assert session.last_schedule.runs == int(np.prod(levels[0]["factor"]))
    _assert_same({k: v.numpy() for k, v in got.items()}, whole)
    deepest = session._max_depth()
    event(f"{len(levels[0]['factor'])}-D, {len(levels)} levels recorded, split {deepest} deep")
    for depth in range(2, deepest + 1):
        plan = session._phase_plan(depth)
        assert plan.splits == int(np.prod([np.prod(level["factor"]) for level in levels[:depth]]))
        _assert_same(plan.run({name: x}), whole)
    for depth in range(1, deepest + 1):  # the trunk on its smallest tiles, where it tiles
        try:
            trunk = session._trunk_axes(depth)
        except DenseError as exc:
            event(f"trunk not tiled: {str(exc)[:60]}")
            continue
        plan = session._phase_plan(depth)
        axes = metadata.read(dense).inputs[name].spatial_axes
        tile = [tiling.minimum_tile_anywhere([o.geometry[k] for o in trunk]) for k in range(len(axes))]
        event(f"trunk in {len(tiling.plan_tiles(x.shape, axes, trunk, tile))} tiles")
        _assert_same(plan.run({name: x}, trunk=lambda f: tiling.run_tiled(plan.stages[0].run, f, name, axes, trunk,
                                                                          tile)), whole)


def test_branches_that_remove_different_strides_name_their_nodes():
    """Two heads on one input, one removing a stride of 2 first, the other 4: the batch cannot
    split at that level, and the refusal names a node of each."""
    from tests._graphs import build

    model = build("""
<ir_version: 9, opset_import: ["" : 17]>
net (float[1,2,32,32] x, float[4,2,3,3] w1, float[4,2,5,5] w2) => (float a, float b) {
  [half] a = Conv <strides=[2,2], pads=[1,1,1,1]> (x, w1)
  [quarter] b = Conv <strides=[4,4], pads=[2,2,2,2]> (x, w2)
}""")
    dense = onnx_dense.rewrite_model(model, output_stride=1, strategy="fragments")
    why = metadata.read(dense).batches["refused"]
    assert why == "its branches remove different strides at level 1: node 'half' (Conv) removes 2x2, node 'quarter' (Conv) 4x4", why
