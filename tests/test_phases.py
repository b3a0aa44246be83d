"""Phase-by-phase runs (runtime/phases.py) and the schedule a memory budget picks (runtime/schedule.py).

Equality: on the CPU provider the phase schedule gives the whole-image outputs bit for bit
for both models here (the same kernels on maps of other sizes); the assertion allows fp32
round-off (1e-6 of the largest value), which is what a size-dependent kernel choice could add.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
import tracemalloc

import numpy as np
import onnx
import pytest
from PIL import Image

from onnx_dense import DenseError, metadata
from onnx_dense.runtime import DenseSession, dense_session, phases, schedule
from onnx_dense.runtime.dense_session import DenseMap, PixelGrid
from tests._graphs import dense_zoo, json_child


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The FCN sample at output stride 1 (eST 16: four split levels, receptive field 108) and a small
    ResNet with its classifier head at output stride 8 (eST 2 and 4, receptive field several hundred)."""
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("phases")
    return {"fcn": dense_zoo(d, "fcn", 1), "resnet": dense_zoo(d, "resnet", 8)}


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


def test_budget_tiles_are_the_smallest_of_their_count_and_equal_the_whole_run(models):
    """Tiles are laid from both ends at full size: the budget takes the smallest tile that needs
    no more tiles than the largest that fits (less overlap recomputed), and the output is the
    whole run's."""
    x = _image(300, seed=2)
    session = DenseSession(models["fcn"], provider="cpu", schedule="phases")
    feeds = session._feeds(x)
    smallest = max(session.minimum_tile())
    for largest in (200, 240, 290):
        tile = session._balanced_tile(feeds, smallest, largest)
        count = session._count_tiles(feeds, (largest, largest))
        assert tile < largest and session._count_tiles(feeds, (tile, tile)) == count
        assert session._count_tiles(feeds, (tile - 1, tile - 1)) > count
    whole = DenseSession(models["fcn"], provider="cpu").run(x)
    plan = session._phase_plan(2)
    got = session._run_tiled(feeds, (tile, tile), None, runner=plan.run)
    _assert_same({k: DenseMap(k, v, None, None) for k, v in got.items()}, whole)


def _pixels_image(size: int, seed: int = 0):
    from onnx_dense.runtime import images

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return images.PixelsImage(pixels, 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3, (2, 3),
                              np.dtype(np.float32))


@pytest.mark.parametrize("name,kind", [("resnet", "tiled-trunk"), ("fcn", "phases+tiles"), ("fcn", "tiled-trunk"),
                                       ("resnet", "phases"), ("fcn", "whole")])
def test_an_image_read_by_windows_is_made_whole_only_by_a_schedule_that_reads_it_whole(models, monkeypatch, name,
                                                                                           kind):
    """An input read by windows (``load_image(..., windows=True)``, what ``onnx-dense run`` feeds
    under a budget): the tiled trunk and phases on tiles compute each tile's window and never the
    whole float input; whole and phases make it once. Outputs are the whole run's on the whole
    input, bit for bit."""
    from onnx_dense.runtime import windowed

    lazy = _pixels_image(300, seed=3)
    want = DenseSession(models[name], provider="cpu").run(np.asarray(lazy))
    made = []
    whole_input = windowed.WindowedInput.__array__
    monkeypatch.setattr(windowed.WindowedInput, "__array__", lambda self, *a, **k: made.append(1) or
                        whole_input(self, *a, **k))
    monkeypatch.setattr(dense_session, "_rss", lambda: 0)
    session = DenseSession(models[name], provider="cpu", schedule=kind, max_memory="1MB")
    got = session.run(lazy)
    assert session.last_schedule.kind == kind
    assert len(made) == (1 if kind in ("whole", "phases") else 0)
    for k in want:
        assert np.array_equal(got[k].numpy(), want[k].numpy()), k


def test_the_estimate_counts_an_image_read_by_windows_where_a_schedule_makes_it_whole(models):
    """A run on the whole image makes a windowed input whole (its bytes added to the estimate);
    tiles and the tiled trunk make one tile's window, as they copy one tile of an array."""
    session = DenseSession(models["resnet"], provider="cpu", max_memory="1GB")
    lazy = _pixels_image(1024)
    plain, read = session._estimator((1024, 1024), base=0), session._estimator((1024, 1024), base=0, unread=lazy.nbytes)
    assert lazy.nbytes == 3 * 1024 * 1024 * 4
    assert read(0) - plain(0) == lazy.nbytes and read(2) - plain(2) == lazy.nbytes
    assert read(2, 400) == plain(2, 400) and read(2, 400, trunk=True) == plain(2, 400, trunk=True)
    feeds = session._feeds(lazy)
    assert feeds[session.image_input] is lazy
    assert dense_session._unread(feeds) == lazy.nbytes


def test_the_budget_picks_the_fastest_schedule_that_fits(models, monkeypatch):
    """Estimates from shape inference; the process's own RSS is taken as 100 MB here."""
    monkeypatch.setattr(dense_session, "_rss", lambda: 100 * 2**20)
    feeds = {"input": _image(1024)}

    def chosen(budget):
        session = DenseSession(models["fcn"], provider="cpu", max_memory=budget)
        return session.choose(session._feeds(feeds))

    roomy, mid, tight, tiny = chosen("16GB"), chosen("700MB"), chosen("300MB"), chosen("170MB")
    assert roomy.kind == "whole" and roomy.estimate <= 16 * 2**30
    assert mid.kind == "phases" and mid.estimate <= 700 * 2**20 < roomy.estimate
    assert tight.kind in ("phases", "phases+tiles") and tight.estimate <= 300 * 2**20
    assert tight.estimate < mid.estimate
    assert tiny.kind == "phases+tiles" and tiny.tiles > 1
    assert "estimated peak" in tiny.describe() and "phases+tiles" in tiny.describe()
    assert "allowed" in tiny.describe() and "over" not in tiny.describe()
    # nothing fits: the leanest schedule runs, and says it is over the budget
    none = chosen("1MB")
    assert none.estimate > 2**20 and "over the 1.00 MB allowed: no schedule fits, this is the fastest" in none.describe()
    # without a budget: as before, whole (or the tile asked for)
    plain = DenseSession(models["fcn"], provider="cpu")
    assert plain.choose(plain._feeds(feeds)).kind == "whole"
    assert plain.choose(plain._feeds(feeds), tile=256).kind == "tiles"


def test_expected_time_counts_what_crosses_the_splits_and_what_tiles_recompute(models):
    """schedule.relative_time, which the choice under a budget minimises: each deeper split moves
    more values across its boundaries (copies and layout changes); tiles recompute all their
    overlap, a tiled trunk only the trunk's; many runs on small maps each pay a fixed cost."""
    session = DenseSession(models["fcn"], provider="cpu")
    prof = session._profile((512, 512))
    by_depth = [schedule.relative_time(prof, session._layout(d).estimate_stages(), side=512) for d in range(1, 5)]
    whole = schedule.relative_time(prof, None, side=512)
    assert whole < by_depth[0] < by_depth[1] < by_depth[2] < by_depth[3], (whole, by_depth)
    stages = session._layout(1).estimate_stages()
    base = schedule.relative_time(prof, stages, side=512)
    assert schedule.relative_time(prof, stages, side=512, pixels=1.5) == pytest.approx(1.5 * base)
    assert base < schedule.relative_time(prof, stages, side=512, trunk_pixels=1.5) < 1.5 * base
    assert schedule.relative_time(prof, stages, side=32) > base


def test_where_only_deep_splits_fit_whole_a_shallow_split_on_tiles_can_be_faster(models, monkeypatch):
    """The FCN at 512 under the leanest untiled split's estimate: its phases of 32x32 or 64x64
    move every level's maps across three or four boundaries, where a shallower split with its
    trunk or the image on tiles recomputes a little overlap (measured on the benchmark FCN at
    512: 256 phases 0.70-0.90 s, 4 phases on 4 tiles 0.62-0.88; at 4096 the tiled trunk of 256
    phases took 35.4 s against 27.5 for 4 phases on tiles, the choice before it was costed).
    The choice is the fitting schedule expected fastest, whatever its kind, and runs exactly."""
    monkeypatch.setattr(dense_session, "_rss", lambda: 300 * 2**20)
    x = _image(512)
    session = DenseSession(models["fcn"], provider="cpu", max_memory="1TB")
    feeds = session._feeds(x)
    estimate, cost = session._estimator((512, 512)), session._coster((512, 512))
    leanest = min(range(1, 5), key=estimate)
    session.max_memory = estimate(leanest)
    assert [d for d in range(1, 5) if estimate(d) <= session.max_memory] == [leanest]
    chosen = session.choose(feeds)
    assert chosen.estimate <= session.max_memory and chosen.kind in ("tiled-trunk", "phases+tiles"), chosen.describe()
    assert chosen.depth < leanest and chosen.cost < cost(leanest), (chosen.describe(), cost(leanest))
    trunk = session._choose_trunk(feeds, (512, 512), range(1, 5), estimate, session.max_memory)
    assert trunk.estimate > session.max_memory or trunk.cost >= chosen.cost, trunk.describe()
    whole = DenseSession(models["fcn"], provider="cpu").run(x)
    _assert_same(session.run(x), whole)
    assert session.last_schedule.kind == chosen.kind


def _two_convs(channels: int, size: int) -> schedule.Profile:
    """Conv 3->C, Relu, Conv C->C, Relu at ``size``: the profile the estimate walks."""
    plain = size * size * 4
    nbytes = {"x": 3 * plain, **{v: channels * plain for v in "abcy"}}
    nodes = [(["x"], ["a"], "Conv"), (["a"], ["b"], "Relu"), (["b"], ["c"], "Conv"), (["c"], ["y"], "Relu")]
    return schedule.Profile((size, size), nbytes, nodes, ["y"], ["x"], channels={"x": 3, **{v: channels for v in "abcy"}})


@pytest.mark.parametrize("block,channels,maps", [(16, 8, 3), (16, 12, 28 / 12), (16, 16, 2), (16, 24, 64 / 24),
                                                 (16, 32, 2), (16, 40, 96 / 40), (8, 8, 2), (8, 12, 32 / 12),
                                                 (0, 8, 2)])
def test_the_estimate_counts_the_copies_of_onnxruntimes_blocked_layout(monkeypatch, block, channels, maps):
    """onnxruntime runs convs in a blocked layout (NCHWc) whose channels are padded to the block:
    a conv of 8 channels writes 16 and copies them back to 8 for the next (it reads fewer than a
    block plain), one of 24 writes 32 and the next reads those. Measured peaks (ORT 1.32,
    AVX-512, in maps of the graph's): 3 for 8 channels, 28/12 for 12, 64/24 for 24, 96/40 for 40,
    2 for 16 and 32; the tests' 8-wide ResNet peaked 1.03-1.08x its estimate without this."""
    monkeypatch.setattr(schedule, "NCHWC_BLOCK", block)
    prof = _two_convs(channels, 256)
    got = schedule.live_peak(prof, prof.nodes, keep={"y"}, skip={"x"})
    assert got == pytest.approx(maps * prof.nbytes["y"], rel=1e-6), (got / prof.nbytes["y"], maps)


def test_two_narrow_convs_stay_within_their_estimate_in_onnxruntime():
    """The same graph in onnxruntime (arena and memory pattern off, as under a budget): what a
    run adds to the process's peak is what the estimate says, on this machine's block."""
    code = textwrap.dedent("""
        import json, re, sys
        import numpy as np, onnx, onnxruntime as ort
        from onnx import helper, numpy_helper, TensorProto
        from onnx_dense.runtime import schedule
        from tests.test_phases import _two_convs
        c, size = int(sys.argv[1]), int(sys.argv[2])
        rng = np.random.default_rng(0)
        w1 = numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w1")
        w2 = numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w2")
        nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4), helper.make_node("Relu", ["a"], ["b"]),
                 helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1] * 4), helper.make_node("Relu", ["c"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, size, size])], [w1, w2])
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = so.enable_mem_pattern = False
        sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                    .SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        status = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        open("/proc/self/clear_refs", "w").write("5")
        base = status("VmRSS")
        y = sess.run(None, {"x": x})[0]
        prof = _two_convs(c, size)
        print(json.dumps({"growth": status("VmHWM") - base, "estimate": schedule.live_peak(prof, prof.nodes, keep={"y"},
                          skip={"x"}), "map": prof.nbytes["y"]}))
    """)
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    for channels in (8, 16, 24):
        got = json_child(code, channels, 1024)
        assert got["growth"] <= got["estimate"] + 8 * 2**20, (channels, got)
        assert got["growth"] >= got["estimate"] - got["map"] // 2, (channels, got)


def test_when_nothing_fits_the_fastest_schedule_near_the_leanest_runs(models, monkeypatch):
    """The image and the outputs stay whatever the tiles: the leanest schedule's many small
    tiles save a few percent of the peak for many more runs (the FCN at 8000 under 1 GB: 5,329
    tiles of 216 for 2.07 GB, against 196 of 671 for 2.09 GB). The choice takes the fastest
    within 5% of the leanest's peak above the process's RSS (100 MB here) and says it is over
    the budget."""
    monkeypatch.setattr(dense_session, "_rss", lambda: 100 * 2**20)
    session = DenseSession(models["fcn"], provider="cpu", max_memory="120MB")
    feeds = session._feeds(_image(2048))
    near = session.choose(feeds)
    leanest = session._choose(feeds, _budget=120 * 2**20)  # the search alone, no second look
    assert leanest.estimate > 120 * 2**20 and near.budget == 120 * 2**20
    assert leanest.estimate <= near.estimate <= 100 * 2**20 + (leanest.estimate - 100 * 2**20) * dense_session.NEAR_LEANEST
    assert near.tiles * max(1, near.runs) < leanest.tiles * max(1, leanest.runs), (near.describe(), leanest.describe())
    assert "no schedule fits, this is the fastest within 5% of the leanest's peak" in near.describe()
    forced = DenseSession(models["fcn"], provider="cpu", max_memory="120MB", schedule="phases")
    assert "no schedule fits, this is the deepest split" in forced.choose(feeds).describe()


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


def test_forced_phases_of_a_model_with_nothing_split_run_its_one_phase_and_say_so(monkeypatch):
    """Rewritten at its own output stride, the dense model is the original: its one phase is
    the whole model. Forced phase schedules used to refuse it; now they run whole (or tiles,
    where a budget needs them) and the schedule says so."""
    import onnx_ir as ir

    from onnx_dense import api
    from tests._graphs import TINY_NET, TINY_WEIGHTS, with_weights

    dense = ir.serde.serialize_model(api.rewrite_model(with_weights(TINY_NET, TINY_WEIGHTS), output_stride=4))
    x = _image(96)
    want = DenseSession(dense, provider="cpu").run(x)
    for kind in ("phases", "tiled-trunk", "phases+tiles"):
        session = DenseSession(dense, provider="cpu", schedule=kind)
        _assert_same(session.run(x), want)
        assert session.last_schedule.kind == "whole", kind
        assert f"({kind} asked for, but the rewrite removed no stride" in session.last_schedule.describe()
        assert session.last_schedule.to_dict()["instead"].startswith(kind)
    monkeypatch.setattr(dense_session, "_rss", lambda: 0)
    big = _image(512)
    tight = DenseSession(dense, provider="cpu", schedule="phases+tiles", max_memory="1MB")
    _assert_same(tight.run(big), DenseSession(dense, provider="cpu").run(big))
    assert tight.last_schedule.kind == "tiles" and "removed no stride" in tight.last_schedule.describe()


def test_the_estimate_counts_each_value_once_and_elementwise_ops_in_place():
    """A chain x (100 B) -> Conv a (400) -> Relu b (400) -> Conv y (200): the Relu writes over its
    input; the image, held by the caller, is counted only when a tile copies it; split after
    the first Conv into 2 phases, the phases' copy of a and their values are halves."""
    nbytes = {"x": 100, "a": 400, "b": 400, "y": 200}
    nodes = [(["x"], ["a"], "Conv"), (["a"], ["b"], "Relu"), (["b"], ["y"], "Conv")]
    prof = schedule.Profile((10,), nbytes, nodes, ["y"], ["x"])
    assert schedule.live_peak(prof, nodes) == 600  # b + y; x + a = 500 before
    not_in_place = [(["x"], ["a"], "Conv"), (["a"], ["b"], "Conv"), (["b"], ["y"], "Conv")]
    assert schedule.live_peak(prof, not_in_place) == 800  # a + b
    assert schedule.live_peak(prof, nodes, keep={"a"}) == 1000  # a kept: b needs its own buffer
    # whole: values (y kept) + y's numpy copy; x only if not resident (a tile's copy)
    assert schedule.whole_peak(prof, margin=1) == 600 + 200
    assert schedule.whole_peak(prof, margin=2) == 1200 + 200
    assert schedule.whole_peak(prof, margin=1, resident=False) == 600 + 200 + 100
    bound = {"bound": True}  # as PhasePlan.estimate_stages says of every stage after the trunk
    stages = [((1,), nodes[:1], ["x"], ["a"]), ((2,), nodes[1:], ["a"], ["y"], bound)]
    # stage 1: y's array and the buffer its phases share (200 + 100) + a carried (400) + a phase's
    # copy of a (200) + its values but y, which is written into that buffer (b: 200)
    assert schedule.phases_peak(prof, stages, ["y"], margin=1) == 300 + 400 + 200 + 200
    assert schedule.phases_peak(prof, stages, ["y"], margin=1, resident=False) == 1200
    assert schedule.phases_peak(prof, stages, ["y"], margin=2) == 300 + 400 + 200 + 2 * 200  # not y's buffer
    # two levels (2 then 4 phases): y's one array + a run's share (250), a carried (400); stage 1's
    # peak: a phase's copy of a (200) and the buffer of its b (200). No array of y per level (+50)
    deeper = [((1,), nodes[:1], ["x"], ["a"]), ((2,), nodes[1:2], ["a"], ["b"], bound), ((4,), nodes[2:], ["b"], ["y"], bound)]
    assert schedule.phases_peak(prof, deeper, ["y"], margin=1) == 250 + 400 + 200 + 200
    assert schedule.phases_peak(prof, deeper, ["y"], margin=2) == 250 + 400 + 200 + 200  # b: a buffer, not onnxruntime's
    # tiles: the stitched outputs, then a tile's run on its own copy
    assert schedule.tiles_peak(prof, prof, stages, ["y"], margin=1) == 200 + 1200


def _two_level_plan(outputs=("y",)) -> phases.PhasePlan:
    """Stages as numpy functions: a map m, split 2x2 into a, each split 2x2 again into y."""
    stages = [
        phases.Stage(0, (1, 1), (1, 1), [], ["x"], ["m"], run=lambda f, buffers=None: {"m": f["x"] * 2}),
        phases.Stage(1, (2, 2), (2, 2), [], ["m"], ["a"], run=lambda f, buffers=None: {"a": f["m"] + 1}),
        phases.Stage(2, (4, 4), (2, 2), [], ["a"], ["y"], run=lambda f, buffers=None: {"y": f["a"] * 3}),
    ]
    return phases.PhasePlan(stages, "x", {"m": (2, 3), "a": (2, 3), "y": (2, 3)}, list(outputs))


@pytest.mark.parametrize("shape", [(1, 2, 37, 29), (1, 3, 5, 4)])
def test_each_phase_is_written_straight_to_its_positions_at_every_depth(shape):
    """Outputs of every level, those a later stage reads too (m, a) among them."""
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    got = _two_level_plan(("m", "a", "y")).run({"x": x})
    assert list(got) == ["m", "a", "y"]
    assert np.array_equal(got["m"], x * 2) and np.array_equal(got["a"], x * 2 + 1)
    assert np.array_equal(got["y"], (x * 2 + 1) * 3)


def test_phases_hold_one_array_per_output_not_one_per_level():
    """While level 2 runs, numpy holds the map m (1), the output (1), level 1's phase of a and its
    copy (1/4 + 1/4 at most) and level 2's (1/16 each): under 2.6x the image. An array per level
    for the output, and the last phase's result kept while the next ran, took 2.94x (before
    2026-12-07: 99 MiB over the estimate for SqueezeNet 1.1 at 1537x1031, which ran over its
    budget)."""
    x = np.random.default_rng(0).standard_normal((1, 4, 256, 256), dtype=np.float32)
    plan = _two_level_plan()
    tracemalloc.start()
    try:
        plan.run({"x": x})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.6 * x.nbytes, peak / x.nbytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_estimate_is_above_the_measured_peak_and_close_to_it(models):
    """ResNet (receptive field of several hundred pixels) at 1024x1024, each schedule in its own
    process: the measured peak is within the estimate, and the estimate (above what the process
    held before the run) is less than twice what the run added. The estimate before these
    rules counted the image up to four times and was 2.8x the measured whole run at 2048."""
    for depth in (0, 1):
        r = json_child(_ESTIMATE_CHILD, models["resnet"], depth)
        assert r["peak"] <= r["estimate"], r
        assert r["estimate"] - r["before"] < 2 * (r["peak"] - r["before"]), r


_ESTIMATE_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from onnx_dense.runtime import DenseSession
    from onnx_dense.runtime.dense_session import _rss

    model, depth = sys.argv[1], int(sys.argv[2])
    x = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024), dtype=np.float32)
    session = DenseSession(model, provider="cpu", max_memory="1TB")
    feeds = session._feeds(x)
    before = _rss()
    estimate = session._estimator((1024, 1024))(depth)
    if depth:
        session._phase_plan(depth).run(feeds)
    else:
        session.run_raw(feeds)
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    print(json.dumps({"peak": peak, "estimate": estimate, "before": before}))
    """
)


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

    budget = 260 * 2**20
    whole, lean = json_child(_PEAK_CHILD, models["fcn"], "-"), json_child(_PEAK_CHILD, models["fcn"], budget)
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


@pytest.mark.parametrize("options", [("--max-memory", "1MB", "--schedule", "phases+tiles"), ("--tile", "128")],
                         ids=["budget", "tiles"])
def test_run_under_a_budget_reads_the_image_by_windows_and_writes_the_unbudgeted_outputs(models, tmp_path,
                                                                                          monkeypatch, options):
    """``onnx-dense run --max-memory`` (or ``--tile``): the image's input is normalised by
    windows, so phases on tiles (or tiles) never make the whole float input (732 MiB of an
    8000x8000 PNG); the .npy written is the untiled run's, byte for byte."""
    from onnx_dense.runtime import windowed
    from tests._cli import run

    Image.fromarray(np.random.default_rng(5).integers(0, 256, (300, 280, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    code, out, err = run("run", models["fcn"], tmp_path / "a.png", "--out", tmp_path / "whole")
    assert code == 0, err

    def never(self, *args, **kwargs):
        raise AssertionError("the whole input was made")

    windows = []
    read = windowed.WindowedInput.read
    monkeypatch.setattr(windowed.WindowedInput, "__array__", never)
    monkeypatch.setattr(windowed.WindowedInput, "read", lambda self, *a: windows.append(a[0]) or read(self, *a))
    monkeypatch.setattr(dense_session, "_rss", lambda: 0)
    code, out, err = run("run", models["fcn"], tmp_path / "a.png", "--out", tmp_path / "tiles", *options)
    assert code == 0, err
    if "--max-memory" in options:
        assert "phases+tiles" in err and "tiles of" in err
    assert len(windows) > 1  # one window a tile
    assert (tmp_path / "tiles" / "a.output.npy").read_bytes() == (tmp_path / "whole" / "a.output.npy").read_bytes()


def test_a_picture_that_would_not_fit_the_budget_is_drawn_in_bands(monkeypatch):
    """matplotlib's figure of a map costs about 80 bytes an image pixel above the run (305 MiB at
    2048x2048); under a budget it is drawn only where that fits, else band by band."""
    from onnx_dense.runtime import batch

    monkeypatch.setattr(dense_session, "_rss", lambda: 100 * 2**20)
    session = dataclasses.make_dataclass("S", [("max_memory", object)])
    image = dataclasses.make_dataclass("I", [("size", tuple)])((1000, 1000))
    figure = batch.FIGURE_BYTES_PER_PIXEL * 1000 * 1000
    assert not batch.stream_pictures(session(None), image)
    assert not batch.stream_pictures(session(100 * 2**20 + figure), image)
    assert batch.stream_pictures(session(100 * 2**20 + figure - 1), image)
    assert batch.stream_pictures(session(None), dataclasses.replace(image, size=(2049, 2048)))


_RUN_PEAK_CHILD = textwrap.dedent(
    """
    import json, sys
    from onnx_dense.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        assert not exc.code, exc.code
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    print(json.dumps({"peak": peak}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_run_with_a_budget_stays_within_it_pictures_included(models, tmp_path):
    """`onnx-dense run` of the tests' ResNet on a 2048x2048 PNG under 320 MB: the run peaked at
    259 MiB and the figure then took the process to 562 MiB (2026-12-07); the picture is now
    drawn band by band, and the whole command stays within the budget."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (2048, 2048, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    budget = 320 * 2**20
    got = json_child(_RUN_PEAK_CHILD, "run", models["resnet"], tmp_path / "big.png", "--out", tmp_path / "o",
                     "--max-memory", str(budget))
    assert got["peak"] <= budget, got["peak"] / 2**20
    record = json.loads((tmp_path / "o" / "big.json").read_text())
    assert record["outputs"]["output"]["png"] == "big.output.png" and record["outputs"]["output"]["picture"] == "bands"
    assert Image.open(tmp_path / "o" / "big.output.png").size == (2048, 2048)


def test_one_tile_is_described_as_the_whole_image(models):
    """A tile larger than the image is one tile, the image itself: the line no longer names a tile
    side the image does not have ("1 tile of 886x886" on a 157x141 image)."""
    one = schedule.Schedule("phases+tiles", depth=1, tile=(886, 886), tiles=1, runs=4)
    assert one.describe() == "phases+tiles, split at 1 eST level, 4 phases, 1 tile (the whole image)"
    trunk = schedule.Schedule("tiled-trunk", depth=1, tile=(300, 300), tiles=1, runs=4)
    assert trunk.describe().startswith("tiled-trunk, trunk in 1 tile (the whole image), split at 1 eST level")
    many = schedule.Schedule("tiles", tile=(64, 64), tiles=9)
    assert many.describe() == "tiles, 9 tiles of 64x64"
    session = DenseSession(models["resnet"], provider="cpu", max_memory="64GB", schedule="phases+tiles")
    x = _image(123)
    session.run(x)
    assert session.last_schedule.tiles == 1
    assert "1 tile (the whole image)" in session.last_schedule.describe()
    assert max(session.last_schedule.tile) > 123  # the tile asked for is kept in to_dict()


def test_a_tight_budget_runs_without_onnxruntimes_memory_pattern(models, monkeypatch):
    """After the first run of a shape, onnxruntime allocates that shape's values as one planned
    block (its memory pattern), measured at 1.2-1.5x the first run's memory: a budget that the
    schedule fits only as first runs use memory turns the pattern off (the sessions are made
    again without it), a budget with room for the pattern keeps it; the output is the same."""
    monkeypatch.setattr(dense_session, "_rss", lambda: 0)  # the estimates without the process's own memory
    x = _image(300)
    want = DenseSession(models["resnet"], provider="cpu").run(x)
    probe = DenseSession(models["resnet"], provider="cpu", max_memory="64GB", schedule="phases")
    size = (300, 300)
    tight = probe._estimator(size)(1)
    roomy = probe._estimator(size, margin=schedule.PATTERN_MARGIN)(1)
    assert roomy > tight
    session = DenseSession(models["resnet"], provider="cpu", max_memory=(tight + roomy) // 2, schedule="phases")
    _assert_same(session.run(x), want)
    chosen = session.last_schedule
    assert chosen.kind == "phases" and chosen.pattern is False and chosen.to_dict()["memory_pattern"] is False
    assert "memory pattern off to stay within the budget" in chosen.describe()
    over = dataclasses.replace(chosen, budget=chosen.estimate - 1)  # nothing fits: no promise to stay within
    assert over.describe().endswith("this is the leanest; onnxruntime's memory pattern off")
    assert all(not s.get_session_options().enable_mem_pattern for s in session._plan.sessions)
    session.max_memory = roomy + 2**20  # room for the pattern: sessions made again with it
    _assert_same(session.run(x), want)
    assert session.last_schedule.pattern is True and "memory pattern" not in session.last_schedule.describe()
    assert all(s.get_session_options().enable_mem_pattern for s in session._plan.sessions)
    plain = DenseSession(models["resnet"], provider="cpu")  # no budget: as before, pattern and arena on
    plain.run(x)
    assert plain.session.get_session_options().enable_mem_pattern


def test_a_split_refused_on_a_small_image_falls_back_to_a_shallower_one(tmp_path, monkeypatch):
    """A VGG's head reads a window of the last map: on a small image a phase of the deepest
    split is shorter than that window and onnxruntime refuses the stage. Where the whole run
    does not fit the budget either, the next shallower split runs (its phases are larger),
    says so, and gives the whole run's outputs; before, the stage's error ended the run."""
    pytest.importorskip("torch")
    model = dense_zoo(tmp_path, "vgg", 2)
    x = np.random.default_rng(4).standard_normal((1, 3, 93, 77), dtype=np.float32)
    want = DenseSession(model, provider="cpu").run(x)
    monkeypatch.setattr(dense_session, "_rss", lambda: 0)
    session = DenseSession(model, provider="cpu", schedule="phases", max_memory="1MB")
    deepest = session.choose({session.image_input: x}).depth
    got = session.run(x)
    assert session.last_schedule.kind == "phases" and session.last_schedule.depth < deepest, session.last_schedule
    assert "refused a stage" in session.last_schedule.describe(), session.last_schedule.describe()
    _assert_same(got, want)
