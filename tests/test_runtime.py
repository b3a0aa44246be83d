"""DenseSession: providers, CUDA settings, IOBinding, the pixel grid, and exact tiling.

The tiling proof: on the FCN sample rewritten to output stride 4, the stitched output of
tiles equals the untiled output (bit for bit on the CPU provider here; the test allows 1e-6
relative) at image sizes that are not multiples of the tile, for square and rectangular
tiles down to the smallest allowed; and a tiling whose margin is one dense stride short is
caught by the same comparison.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnx_dense
from onnx_dense import DenseError, api, metadata
from onnx_dense.runtime import DenseSession, OrtRunner, PixelGrid, cuda_options, resolve_provider, tiling
from tests._graphs import TINY_NET, TINY_WEIGHTS, dense_zoo, with_weights

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """TINY_NET rewritten to output stride 2: a dense grid every 2 pixels, eST 2."""
    d = tmp_path_factory.mktemp("tiny")
    onnx.save(with_weights(TINY_NET, TINY_WEIGHTS), str(d / "net.onnx"))
    onnx_dense.rewrite(d / "net.onnx", d / "dense.onnx", output_stride=2)
    return str(d / "dense.onnx")


@pytest.fixture(scope="module")
def fcn(tmp_path_factory):
    """The FCN sample, exported by the TorchScript exporter, rewritten to output stride 4."""
    pytest.importorskip("torch")
    return dense_zoo(tmp_path_factory.mktemp("fcn"), "fcn", 4)


@pytest.fixture(scope="module")
def fcn_session(fcn):
    with DenseSession(fcn, provider="cpu") as session:
        yield session


# ------------------------------------------------------------------------------------------
# tiling
# ------------------------------------------------------------------------------------------


def test_fcn_tiled_equals_untiled(fcn_session):
    out = fcn_session.info.outputs["output"]
    assert (out.stride, out.rf_start, out.rf_size) == ((4, 4), (-30, -30), (108, 108))
    smallest = fcn_session.minimum_tile()
    assert smallest == (110, 110)
    rng = np.random.default_rng(0)
    for size in [(150, 133), (261, 97), (97, 229)]:
        x = rng.standard_normal((1, 3, *size)).astype(np.float32)
        whole = fcn_session.run(x)["output"].numpy()
        for tile in [smallest, (128, 128), (141, 113)]:
            counted = []
            tiled = fcn_session.run(x, tile=tile, progress=lambda done, total: counted.append(total))["output"]
            assert tiled.shape == whole.shape, (size, tile)
            diff = float(np.max(np.abs(tiled.numpy() - whole)))
            # 0 on onnxruntime's CPU provider here; 1e-6 relative leaves room for a kernel that
            # picks another accumulation order at another size
            assert diff == 0.0 or diff <= 1e-6 * float(np.max(np.abs(whole))), (size, tile, diff)
            assert tiled.grid.shape == whole.shape[2:]
            expected_tiles = [len(tiling.plan_axis(n, t, [tiling.Geometry(4, -30, 108)])) for n, t in zip(size, tile)]
            assert counted[-1] == expected_tiles[0] * expected_tiles[1] > 1


def test_a_margin_one_stride_short_is_caught(fcn_session):
    """The comparison above has teeth: shrinking the receptive field by one stride breaks it."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 200, 170)).astype(np.float32)
    whole = fcn_session.run(x)["output"].numpy()
    short = [tiling.OutputAxes("output", (2, 3), (tiling.Geometry(4, -26, 100),) * 2)]
    tiled = tiling.run_tiled(fcn_session.run_raw, {"input": x}, "input", (2, 3), short, (128, 128))["output"]
    assert tiled.shape == whole.shape
    assert np.max(np.abs(tiled - whole)) > 1e-3


def test_plan_axis_partitions_the_predictions():
    """Arithmetic of the plan: aligned tiles within the size, contiguous exact ownership."""
    rnd = random.Random(0)
    for _ in range(600):
        stride = rnd.choice([1, 2, 4, 8])
        geometries = [tiling.Geometry(stride, -rnd.randrange(0, 40), rnd.randrange(1, 90))]
        if rnd.random() < 0.2:  # a field narrower than the stride (a 1x1 pool of stride 2): tiles of less than a stride
            geometries = [tiling.Geometry(stride, 0, rnd.randrange(1, stride + 1))]
        if rnd.random() < 0.3:
            geometries.append(tiling.Geometry(stride * 2, -rnd.randrange(0, 40), rnd.randrange(1, 90)))
        smallest = tiling.minimum_tile(geometries)
        tile = smallest + rnd.randrange(0, 60)
        extent = rnd.randrange(1, 700)
        plan = tiling.plan_axis(extent, tile, geometries)
        assert plan[0].start == 0 and plan[-1].stop == extent
        align = max(g.stride for g in geometries)
        # every tile as long as the image modulo the stride, at most a stride off the size asked
        assert all((span.stop - span.start - extent) % align == 0 for span in plan), (extent, tile, geometries)
        field = max(g.rf_size for g in geometries)
        for i, span in enumerate(plan):
            assert 0 < span.stop - span.start < tile + align, (extent, tile, geometries)
            if i == len(plan) - 1:  # a whole field, or the image
                assert span.stop - span.start >= min(extent, field), (extent, tile, geometries)
            assert span.start % max(g.stride for g in geometries) == 0
            for j, g in enumerate(geometries):
                offset = span.start // g.stride
                if i > 0:
                    assert span.own_from[j] == plan[i - 1].own_to[j]
                    assert span.own_from[j] - offset >= g.first_exact()
                if i < len(plan) - 1:
                    assert span.own_to[j] - 1 - offset <= g.last_exact(span.stop - span.start)
                    assert span.own_to[j] > span.own_from[j]


def test_tiles_of_a_join_whose_branches_agree_only_at_the_image_size_equal_the_whole_run():
    """Found by random chains: a strided 1x1 conv then a 2x2 pool beside a 3x5 conv of the same
    stride (2x3), added. Their lengths agree at 17 (odd) and differ at 10; tiles of 10 made
    onnxruntime refuse the Add. Tiles as long as the image modulo the stride agree."""
    from tests.test_property import Branch, Layer, Spec, build

    def layer(op, k, s):
        return Layer(op, k, s, (0,) * 4, (1, 1), out_channels=1 if op == "Conv" else 0)

    spec = Spec(20, 1, (17, 17), (
        Branch(a=(layer("Conv", (1, 1), (2, 3)), layer("MaxPool", (2, 2), (1, 1))),
               b=(layer("Conv", (3, 5), (2, 3)),), join="Add"),
        layer("Conv", (1, 1), (1, 1))))
    dense = ir.serde.serialize_model(api.rewrite_model(build(spec), output_stride=(1, 3)))
    x = np.random.default_rng(0).standard_normal((1, 1, 17, 17), dtype=np.float32)
    want = DenseSession(dense, provider="cpu").run(x)["output"].numpy()
    for tile in (9, 10, 11):
        got = DenseSession(dense, provider="cpu", tile=tile).run(x)["output"].numpy()
        np.testing.assert_array_equal(got, want)


CROPPED_JOIN = """
<ir_version: 9, opset_import: ["" : 17]>
g (float[1,2,16,16] x) => (float y) <float[2,2,3,3] w, float[2,2,1,1] w1, float[3,2,3,3] w2> {
    a = Conv <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x, w)
    b = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (x)
    b1 = Conv <kernel_shape = [1, 1]> (b, w1)
    s = Add (a, b1)
    y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (s, w2)
}
"""


def test_tiles_of_a_join_the_rewrite_crops_equal_the_whole_run():
    """A padded strided conv beside a 2x2 pool of the same stride: the dense branches differ in
    length by one, and the rewrite crops both to the shorter (AlignJoins). Such a crop keeps
    every position where it is and cuts only positions one branch lacks, which no exact
    prediction of a tile reads; tiling used to refuse it, and budgets too small for the whole
    run failed asking to "run without --tile"."""
    proto = with_weights(CROPPED_JOIN, {"w": (2, 2, 3, 3), "w1": (2, 2, 1, 1), "w2": (3, 2, 3, 3)})
    dense = ir.serde.serialize_model(api.rewrite_model(proto, output_stride=1))
    assert "Slice" in {n.op_type for n in dense.graph.node}
    x = np.random.default_rng(1).standard_normal((1, 2, 61, 53), dtype=np.float32)
    want = DenseSession(dense, provider="cpu").run(x)["y"].numpy()
    for tile in (12, 16, 23):
        got = DenseSession(dense, provider="cpu", tile=tile).run(x)["y"].numpy()
        np.testing.assert_array_equal(got, want)
    session = DenseSession(dense, provider="cpu", schedule="phases+tiles", tile=None)
    np.testing.assert_array_equal(session.run(x)["y"].numpy(), want)
    assert session.last_schedule.kind == "phases+tiles"


def test_values_after_a_join_crop_have_their_size_in_the_estimate_and_the_tiling_check():
    """ONNX shape inference stops at the crop's Min of lengths: the crop and everything after it
    had no dims, so the memory estimate counted them as one pixel each, and tiling took their
    channel axis for a spatial one (a Concat on channels after a crop was refused)."""
    from onnx_dense.runtime import schedule

    proto = with_weights(CROPPED_JOIN, {"w": (2, 2, 3, 3), "w1": (2, 2, 1, 1), "w2": (3, 2, 3, 3)})
    dense = ir.serde.serialize_model(api.rewrite_model(proto, output_stride=1))
    x = np.zeros((1, 2, 120, 90), np.float32)
    y = DenseSession(dense, provider="cpu").run(x)["y"].numpy()
    info = metadata.read(dense)
    prof = schedule.profile(dense, info, "x", (120, 90))
    assert prof.nbytes["y"] == y.nbytes and prof.nbytes["s"] == y.nbytes * 2 // 3
    spatial = tiling._spatial_axes(dense, info, "x")
    assert spatial["s"] == {2, 3} and spatial["y"] == {2, 3}


def test_every_value_of_a_fragments_model_has_its_size_in_the_estimate():
    """A fragments model moves phases with Reshapes and Slices whose shapes come from Shape
    arithmetic (Div, Mul) that ONNX's data propagation does not follow: 40 of DeepLab's 125
    values had no dims, and its estimate was half the measured peak (202 MB against 401 MiB),
    so a budget between the two was exceeded. infer_static evaluates that arithmetic."""
    from onnx_dense.runtime import schedule

    proto = with_weights(TINY_NET, TINY_WEIGHTS)
    dense = ir.serde.serialize_model(api.rewrite_model(proto, output_stride=1, strategy="fragments"))
    info = metadata.read(dense)
    light = tiling._light_copy(dense, "input", {2: 72, 3: 56})
    inferred = tiling.infer_static(light)
    made = {o for n in dense.graph.node for o in n.output}
    dims = {vi.name: vi.type.tensor_type.shape.dim for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    unknown = [n for n, d in dims.items() if not all(x.HasField("dim_value") for x in d)]
    folded = {t.name for t in light.graph.initializer}  # the shape arithmetic, now constants
    assert not unknown and made - folded <= set(dims), (unknown, made - folded - set(dims))
    y = DenseSession(dense, provider="cpu").run(np.zeros((1, 3, 72, 56), np.float32))["output"].numpy()
    assert schedule.profile(dense, info, "input", (72, 56)).nbytes["output"] == y.nbytes


def test_a_budget_too_small_for_an_untileable_model_runs_its_leanest_untiled_schedule(monkeypatch):
    """Tiles are the budget's last resort; a model that cannot be tiled used to fail there with
    "run without --tile" though none was asked for. Now the leanest of whole, phases and the
    tiled trunk runs and says why; forced phases on tiles are refused in one line."""
    proto = with_weights(CROPPED_JOIN, {"w": (2, 2, 3, 3), "w1": (2, 2, 1, 1), "w2": (3, 2, 3, 3)})
    dense = ir.serde.serialize_model(api.rewrite_model(proto, output_stride=1))
    x = np.random.default_rng(2).standard_normal((1, 2, 400, 400), dtype=np.float32)
    want = DenseSession(dense, provider="cpu").run(x)["y"].numpy()
    real = tiling.check_tileable

    def refuse(proto, info, name, nodes=None):
        real(proto, info, name, nodes)
        raise DenseError("node 'n' (Foo): it looks at the whole map, so tiles would not match the whole image; "
                         "run without --tile")

    monkeypatch.setattr(tiling, "check_tileable", refuse)
    session = DenseSession(dense, provider="cpu", max_memory="1MB")
    np.testing.assert_array_equal(session.run(x)["y"].numpy(), want)
    chosen = session.last_schedule
    assert chosen.kind in ("whole", "phases") and "no tiles: node 'n' (Foo)" in chosen.describe()
    assert "--tile" not in chosen.describe()
    with pytest.raises(DenseError, match="cannot run by phases on tiles .node 'n'"):
        DenseSession(dense, provider="cpu", max_memory="1MB", schedule="phases+tiles").run(x)


@pytest.mark.parametrize("starts, ends", [("1, 1", "m"), ("0, 0", "e")], ids=["shifted", "constant-end"])
def test_a_crop_that_moves_or_fixes_positions_is_still_refused(starts, ends):
    """Only the rewrite's kind of crop tiles: from 0, to the shortest of run-time lengths."""
    body = f"""
        st = Constant <value = int64[2] {{{starts}}}> ()
        e = Constant <value = int64[2] {{5, 5}}> ()
        ax = Constant <value = int64[2] {{2, 3}}> ()
        sh = Shape (c)
        l = Gather <axis = 0> (sh, ax)
        m = Min (l, l)
        y = Slice (c, st, {ends}, ax)"""
    with pytest.raises(DenseError, match="crops a spatial axis"):
        tiling.check_tileable(_graph(body), _info(), "x")


def test_a_last_tile_shorter_than_the_field_is_moved_back():
    """Found by random chains: the last tile, aligned and ending on the image's end, was one
    pixel long on a 19-pixel image (tiles of 6, stride 6). onnxruntime gives a 2-wide pool one
    prediction on one pixel, so the stitched map had a fourth row the whole run has not. The
    last tile now starts a stride earlier until it holds a whole field: every layer then has
    a whole window, and its length falls by exactly start / stride."""
    from tests.test_property import Layer, Spec, build

    def pool(k, s, ceil):
        return Layer("MaxPool", (k, k), (s, s), (0,) * 4, (1, 1), ceil_mode=ceil)

    spec = Spec(20, 1, (17, 17), (pool(1, 2, 1), pool(2, 3, 0)))
    dense = ir.serde.serialize_model(api.rewrite_model(build(spec), output_stride=6))
    for n, tile in ((19, 6), (20, 6), (20, 7), (23, 6)):
        x = np.random.default_rng(n).standard_normal((1, 1, n, n), dtype=np.float32)
        want = DenseSession(dense, provider="cpu").run(x)["output"].numpy()
        got = DenseSession(dense, provider="cpu", tile=tile).run(x)["output"].numpy()
        assert got.shape == want.shape, (n, tile)
        np.testing.assert_array_equal(got, want)


def test_tiles_too_short_to_shorten_to_the_image_modulo_the_stride_are_lengthened():
    """Found by random chains: as above, a join whose branches agree only at the image size
    (23 pixels), but tiles of 10 along an axis of stride 4 cannot be shortened to 7 (too few
    pixels for an exact prediction). They used to run at 10 and onnxruntime refused the Add;
    they now run at 11, less than a stride over the size asked."""
    from tests.test_property import Branch, Layer, Spec, build

    def conv(k, s, pads=(0,) * 4):
        return Layer("Conv", k, s, pads, (1, 1), out_channels=1)

    def pool(k, s, pads=(0,) * 4):
        return Layer("MaxPool", k, s, pads, (1, 1))

    spec = Spec(20, 1, (23, 23), (
        conv((2, 2), (1, 1)),
        Branch(a=(conv((1, 1), (1, 2)), pool((5, 5), (1, 1), (0, 3, 0, 3)), pool((1, 1), (2, 2))),
               b=(conv((6, 1), (2, 4), (0, 0, 0, 3)),), join="Add"),
        conv((1, 1), (1, 1))), taps=(0,))
    dense = ir.serde.serialize_model(api.rewrite_model(build(spec), output_stride=2))
    x = np.random.default_rng(3).standard_normal((1, 1, 23, 23), dtype=np.float32)
    want = DenseSession(dense, provider="cpu").run(x)
    for tile in ((7, 10), (8, 10)):
        got = DenseSession(dense, provider="cpu", tile=tile).run(x)
        for name in want:
            np.testing.assert_array_equal(got[name].numpy(), want[name].numpy())


def test_tile_smaller_than_the_receptive_field_is_refused(fcn_session):
    with pytest.raises(DenseError, match="use at least 110x110"):
        fcn_session.run(np.zeros((1, 3, 300, 300), np.float32), tile=100)
    with pytest.raises(DenseError, match="--tile 'big'"):
        fcn_session.run(np.zeros((1, 3, 300, 300), np.float32), tile="big")


def _info(input_size=(16, 16)) -> metadata.DenseInfo:
    return metadata.DenseInfo(
        (1,), "dilate", {"x": metadata.DenseInput("x", (2, 3), input_size)},
        {"y": metadata.DenseOutput("y", (2, 3), (1, 1), (1, 1), (1, 1), (3, 3), (-1, -1), False, "x", input_size, input_size)},
    )


def _graph(body: str, out_type: str = "float[1,4,?,?] y", extra_inits: str = "") -> onnx.ModelProto:
    text = f"""
    <ir_version: 9, opset_import: ["" : 20]>
    g (float[1,3,h,w] x) => ({out_type}) <float[4,3,3,3] w{extra_inits}> {{
        c = Conv <pads = [1,1,1,1]> (x, w)
        {body}
    }}
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"))
    return model


@pytest.mark.parametrize(
    "body, reason",
    [
        ("y = Softmax <axis = 1> (c)", None),
        ("y = ReduceMax <keepdims = 1> (c, ax)\n ax = Constant <value = int64[1] {1}> ()", None),
        ("y = Concat <axis = 1> (c, c)", None),
        ("y = Softmax <axis = -1> (c)", "normalises over a spatial axis"),
        ("ax = Constant <value = int64[2] {2, 3}> ()\n y = ReduceMean <keepdims = 1> (c, ax)", "reduces over a spatial axis"),
        ("y = Concat <axis = 2> (c, c)", "spatial axis 2"),
        ("y = GlobalAveragePool (c)", "looks at the whole map"),
        ("s = Constant <value = int64[1] {1}> ()\n e = Constant <value = int64[1] {100}> ()\n"
         " a = Constant <value = int64[1] {3}> ()\n y = Slice (c, s, e, a)", "crops a spatial axis"),
        ("sc = Constant <value = float[4] {1, 1, 2, 2}> ()\n y = Resize <mode = \"nearest\"> (c, , sc)",
         "looks at the whole map"),
        ("y = MaxPool <kernel_shape = [2,2], strides = [2,2], auto_pad = \"SAME_UPPER\"> (c)", "pads by the input size"),
    ],
    ids=["softmax-channels", "reduce-channels", "concat-channels", "softmax-width", "reduce-spatial",
         "concat-height", "global-pool", "slice-width", "resize", "same-strided"],
)
def test_check_tileable(body, reason):
    body = "\n".join(line for line in body.splitlines() if line.strip())
    # Constants must come before their use in the parser's text: put them first.
    lines = sorted(body.split("\n"), key=lambda line: "Constant" not in line)
    model = _graph("\n".join(lines))
    if reason is None:
        tiling.check_tileable(model, _info(), "x")
    else:
        with pytest.raises(DenseError, match=reason):
            tiling.check_tileable(model, _info(), "x")


def test_fragments_and_global_context_models_are_not_tiled():
    """Their phases pad or average by the map's size: refused before any tile runs."""
    proto = with_weights(TINY_NET, TINY_WEIGHTS)
    fragments = ir.serde.serialize_model(api.rewrite_model(proto, output_stride=2, strategy="fragments"))
    session = DenseSession(fragments, provider="cpu")
    assert session.run(np.ones((1, 3, 40, 40), np.float32))["output"].shape == (1, 4, 20, 20)
    with pytest.raises(DenseError, match="strategy 'fragments'"):
        session.run(np.ones((1, 3, 40, 40), np.float32), tile=20)
    # a budget too small for them (segmentation heads are often fragments) takes the leanest
    # untiled schedule (by phases of their batch: tests/test_fragment_batches.py) and says why
    budgeted = DenseSession(fragments, provider="cpu", max_memory="1MB")
    np.testing.assert_array_equal(budgeted.run(np.ones((1, 3, 40, 40), np.float32))["output"].numpy(),
                                  session.run(np.ones((1, 3, 40, 40), np.float32))["output"].numpy())
    assert budgeted.last_schedule.kind in ("whole", "phases", "tiled-trunk")  # the trunk before the moves tiles
    assert ("the fastest within 5% of the leanest's peak (no tiles" in budgeted.last_schedule.describe()
            and "this model was rewritten with strategy 'fragments'" in budgeted.last_schedule.describe())
    # asked for phases on tiles, they tile the trunk only, and say why
    forced = DenseSession(fragments, provider="cpu", schedule="phases+tiles")
    forced.run(np.ones((1, 3, 40, 40), np.float32))
    assert forced.last_schedule.kind == "tiled-trunk"
    assert forced.last_schedule.instead.startswith("phases+tiles asked for, but a 'fragments' model is tiled only "
                                                   "before its first moves to the batch")
    info = dataclasses.replace(_info(), per_phase_global=True)
    with pytest.raises(DenseError, match="global context"):
        tiling.check_tileable(_graph("y = Relu (c)"), info, "x")


# ------------------------------------------------------------------------------------------
# the grid
# ------------------------------------------------------------------------------------------


def test_grid_puts_each_prediction_on_its_receptive_field(tiny):
    """Change one input pixel: exactly the predictions whose field (from the grid) covers it can change."""
    session = DenseSession(tiny, provider="cpu")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 40, 36)).astype(np.float32)
    base = session.run(x)["output"]
    grid = base.grid
    assert grid.stride == (2, 2) and grid.spatial_axes == (2, 3)
    assert grid.shape == base.shape[2:]
    assert grid.origin == tuple(a + (r - 1) / 2 for a, r in zip(grid.rf_start, grid.rf_size))
    ys, xs = grid.mesh()
    assert ys.shape == grid.shape and xs[0, 1] - xs[0, 0] == 2
    assert list(grid.centres(1)) == session.info.outputs["output"].centres(1, grid.shape[1])
    for py, px in [(20, 17), (3, 30), (39, 0)]:
        y = x.copy()
        y[0, :, py, px] += 50.0
        changed = np.any(session.run(y)["output"].numpy() != base.numpy(), axis=(0, 1))
        half = [(r - 1) / 2 for r in grid.rf_size]
        cy, cx = grid.mesh()
        inside = (np.abs(cy - py) <= half[0]) & (np.abs(cx - px) <= half[1])
        assert changed.any()
        assert not np.any(changed & ~inside), (py, px)
        iy, ix = grid.nearest(py, 0), grid.nearest(px, 1)
        assert changed[iy, ix]
        assert abs(grid.pixel((iy, ix))[0] - py) <= grid.stride[0] / 2 + max(0, grid.origin[0] - py)


def test_pixel_grid_arithmetic():
    grid = PixelGrid((2, 3), (3, 4), (4, 8), (-30, -2), (108, 5))
    assert grid.origin == (23.5, 0.0)
    assert list(grid.centres(0)) == [23.5, 27.5, 31.5]
    assert grid.pixel((2, 3)) == (31.5, 24.0)
    assert list(grid.nearest([0, 25, 29.6, 1000], 0)) == [0, 0, 2, 2]
    assert grid.to_dict()["origin"] == [23.5, 0.0]


# ------------------------------------------------------------------------------------------
# providers and options
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_cuda_requested_but_absent_is_a_clear_error(tiny):
    assert resolve_provider("auto") == "cpu"
    with pytest.raises(DenseError) as info:
        DenseSession(tiny, provider="cuda")
    message = str(info.value)
    assert "provider 'cuda'" in message and "no CUDA execution provider" in message and "onnxruntime-gpu" in message
    assert "\n" not in message


def test_unknown_provider_and_cpu_only_options(tiny):
    with pytest.raises(DenseError, match="unknown provider 'tpu'"):
        DenseSession(tiny, provider="tpu")
    with pytest.raises(DenseError, match="nhwc"):
        DenseSession(tiny, provider="cpu", nhwc=True)


def test_cuda_options():
    assert cuda_options()["cudnn_conv_algo_search"] == "HEURISTIC"
    fixed = cuda_options(fixed_shapes=True, device_id=1, nhwc=True)
    assert fixed == {
        "device_id": "1", "cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1", "prefer_nhwc": "1",
    }
    assert cuda_options(conv_algo_search="heuristic", fixed_shapes=True)["cudnn_conv_algo_search"] == "HEURISTIC"
    with pytest.raises(DenseError, match="DEFAULT is refused"):
        cuda_options(conv_algo_search="DEFAULT")


def test_spinning_switch_reaches_the_session(tiny):
    """spinning=False must end up in the session's config (both runners); None leaves ORT's default alone."""
    keys = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
    quiet = DenseSession(tiny, provider="cpu", spinning=False).session.get_session_options()
    assert [quiet.get_session_config_entry(k) for k in keys] == ["0", "0"]
    with OrtRunner(tiny, spinning=False) as run:
        options = run.session.get_session_options()
        assert [options.get_session_config_entry(k) for k in keys] == ["0", "0"]
    with OrtRunner(tiny, spinning=True) as run:
        assert run.session.get_session_options().get_session_config_entry(keys[0]) == "1"
    default = DenseSession(tiny, provider="cpu").session.get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):
        default.get_session_config_entry(keys[0])


def test_iobinding_and_inputs(tiny):
    session = DenseSession(tiny, provider="cpu")
    assert session.providers == ["CPUExecutionProvider"] and session.image_input == "input"
    x = np.random.default_rng(0).standard_normal((1, 3, 24, 20))
    plain = session.run(x)["output"]  # float64 in: cast to the model's float32
    assert plain.value.dtype == np.float32
    kept = session.run(x, keep_on_device=True)["output"]
    assert isinstance(kept.value, ort.OrtValue) and kept.value.device_name() == "cpu"
    assert np.array_equal(kept.numpy(), plain.numpy()) and kept.grid == plain.grid
    value = ort.OrtValue.ortvalue_from_numpy(x.astype(np.float32))
    assert np.array_equal(session.run({"input": value})["output"].numpy(), plain.numpy())
    with pytest.raises(DenseError, match="no input"):
        session.run({"input": x, "other": x})
    with pytest.raises(DenseError, match="keep_on_device needs an untiled run"):
        session.run(x, tile=16, keep_on_device=True)
    with pytest.raises(DenseError, match="onnxruntime failed to run"):
        session.run(np.zeros((1, 5, 24, 20), np.float32))
    session.close()


def test_model_in_memory_and_not_dense(tiny, tmp_path):
    proto = onnx.load(tiny)
    a = DenseSession(proto, provider="cpu", optimize=False).run(np.ones((1, 3, 16, 16), np.float32))
    b = DenseSession(tiny, provider="cpu").run(np.ones((1, 3, 16, 16), np.float32))
    np.testing.assert_allclose(a["output"].numpy(), b["output"].numpy(), rtol=1e-5, atol=1e-6)
    plain = tmp_path / "plain.onnx"
    onnx.save(with_weights(TINY_NET, TINY_WEIGHTS), str(plain))
    with pytest.raises(DenseError, match="no onnx_dense metadata"):
        DenseSession(str(plain), provider="cpu")
    with pytest.raises(DenseError, match="no such file"):
        DenseSession(str(tmp_path / "missing.onnx"), provider="cpu")


def test_fp16_runs_close_to_fp32(tiny):
    x = np.random.default_rng(0).standard_normal((1, 3, 30, 26)).astype(np.float32)
    full = DenseSession(tiny, provider="cpu").run(x)["output"].numpy()
    half = DenseSession(tiny, provider="cpu", fp16=True).run(x)["output"]
    assert half.value.dtype == np.float32  # inputs and outputs stay float32
    assert np.max(np.abs(half.numpy() - full)) <= 1e-2 * np.max(np.abs(full))
    proto = onnx.load(tiny)
    before = proto.SerializeToString()
    DenseSession(proto, provider="cpu", fp16=True)
    assert proto.SerializeToString() == before  # the caller's model is not converted in place


# ------------------------------------------------------------------------------------------
# CUDA (skipped without onnxruntime-gpu and a device)
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu (CUDAExecutionProvider)")
def test_cuda_ort_runner_uses_cuda_settings(fcn):
    """verify and bench on CUDA: the CUDA provider itself (no quiet CPU retry) with EXHAUSTIVE search."""
    with OrtRunner(fcn, provider="cuda", optimize=True) as run:
        assert run.session.get_providers()[0] == "CUDAExecutionProvider"
        options = run.session.get_provider_options()["CUDAExecutionProvider"]
        assert options["cudnn_conv_algo_search"] == "EXHAUSTIVE" and options["cudnn_conv_use_max_workspace"] == "1"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu (CUDAExecutionProvider)")
def test_cuda_session_matches_cpu_and_keeps_outputs_on_device(fcn):
    x = np.random.default_rng(0).standard_normal((1, 3, 181, 150)).astype(np.float32)
    cpu = DenseSession(fcn, provider="cpu").run(x)["output"].numpy()
    session = DenseSession(fcn, provider="cuda")
    assert session.providers[0] == "CUDAExecutionProvider"
    options = session.session.get_session_options()
    assert options.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    assert session.session.get_provider_options()["CUDAExecutionProvider"]["cudnn_conv_algo_search"] == "HEURISTIC"
    kept = session.run(x, keep_on_device=True)["output"]
    assert isinstance(kept.value, ort.OrtValue) and kept.value.device_name().lower() == "cuda"
    gpu = kept.numpy()
    scale = np.max(np.abs(cpu))
    assert np.max(np.abs(gpu - cpu)) <= 1e-4 * scale
    tiled = session.run(x, tile=128)["output"].numpy()
    assert np.max(np.abs(tiled - gpu)) <= 1e-5 * scale
    half = DenseSession(fcn, provider="cuda", fp16=True, nhwc=True, fixed_shapes=True).run(x)["output"].numpy()
    assert np.max(np.abs(half - cpu)) <= 2e-2 * scale


def test_fixed_size_fixes_the_input_dims_and_refuses_other_sizes(tiny):
    """fixed_size: the symbolic spatial dims become static for ORT (its input shape says so),
    the outputs equal a free session's, another size is one clear error, and tiles (runs at
    other sizes) are refused at construction."""
    x = np.random.default_rng(0).standard_normal((1, 3, 24, 20)).astype(np.float32)
    with DenseSession(tiny, provider="cpu") as free, DenseSession(tiny, provider="cpu", fixed_size=(24, 20)) as fixed:
        assert fixed.session.get_inputs()[0].shape[2:] == [24, 20]
        assert fixed.fixed_size == (24, 20) and free.fixed_size is None
        np.testing.assert_array_equal(fixed.run(x)["output"].numpy(), free.run(x)["output"].numpy())
        with pytest.raises(DenseError, match=r"fixed to size \(24, 20\)"):
            fixed.run(np.zeros((1, 3, 26, 20), np.float32))
    with pytest.raises(DenseError, match="cannot be combined with tile"):
        DenseSession(tiny, provider="cpu", fixed_size=24, tile=16)
    with pytest.raises(DenseError, match="one positive size per spatial axis"):
        DenseSession(tiny, provider="cpu", fixed_size=(24, 20, 3))
